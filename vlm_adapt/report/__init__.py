"""Reports: read sweep directories (metrics.json + resolved configs) and write tables and plots."""
