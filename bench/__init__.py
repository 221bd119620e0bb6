"""
Side-by-side benchmarks of muxtwist against direct serving, HAProxy, sslh
and ``twistd portforward``, all on 127.0.0.1.

``python -m bench`` runs every scenario; ``--quick`` a short, noisy version;
``--only NAME`` one scenario. Results go to ``bench/results/`` (JSON and
Markdown) and ``docs/performance.md`` with the chart ``docs/performance.png``.
"""
