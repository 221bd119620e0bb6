Under --workers, scrapes of /metrics, /status.json and the stats page that arrive while the workers are being asked share that answer: 100 concurrent scrapes cost each worker one request.
