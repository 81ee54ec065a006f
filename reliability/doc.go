// Package reliability holds the cross-package fault suites: network faults injected between
// the real dps and hub clients and the emulators, power loss under the real agent binary
// (registering, sending telemetry, renewing its operational certificate), hostile servers
// and replies, and the log-secrecy check. It has no code of its own; the
// tests run in short form under `make test` and in full under `make reliability`
// (RELIABILITY_LONG=1).
package reliability
