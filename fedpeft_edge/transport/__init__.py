"""MQTT transport: FedML's messaging contract on paho-mqtt (the only place that imports paho or fedml)."""
