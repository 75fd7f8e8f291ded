"""edge-web: the local site dashboard, fed by what the agents publish on MQTT."""
