// Package device is the agent: the lifecycle that takes the gateway from power-on to a live IoT Hub connection and keeps it there, the policy that paces it, and the
// status it reports to systemd, to `unicity status` and over the local API. It speaks no
// MQTT itself: DPS and the hub are reached through the dps and hub packages, behind the small
// Provisioner and Hub interfaces declared here.
//
// The lifecycle (Agent.Run), one phase at a time, never exiting on a transient problem:
//
//	waiting_for_lock   another unicity process (a reprovision run by hand) holds the state
//	loading_identity   TPM, key and certificate; a TPM that does not answer yet is retried
//	waiting_for_clock  the clock is before the build or the certificate's NotBefore
//	provisioning       registering with DPS: backoff with full jitter, retry-after honoured,
//	                   a random first-boot delay when configured
//	parked             DPS refused the device for good; slow retry, or `unicity reprovision`
//	connecting         to the assigned hub; a refused identity or a stale assignment sends
//	                   the agent back to DPS, at most once per [agent] reprovision_interval
//	connected          READY=1; the session reconnects by itself
//
// Only an unusable configuration or identity ends Run with an error (exit 78).
//
// The local API (package localapi) and the gateway relay (package gateway) run beside the
// lifecycle as Agent.Services and reach it through Status, Subscribe, Register, Assignment
// and NoteError.
package device
