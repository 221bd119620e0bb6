A `log_connections` setting turns the per-connection end event off; per-connection metrics are plain counters turned into Prometheus families at scrape time.
