// Package device is the agent: its configuration, the lifecycle that takes the gateway from
// power-on to a live IoT Hub connection and keeps it there (clock, identity, provisioning,
// connection, re-registration), the policy that paces it, the status it reports to systemd,
// to `unicity status` and to the local API. It speaks no MQTT itself: DPS and the hub are
// reached through the dps and hub packages, behind the small interfaces declared here.
package device
