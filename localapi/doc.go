// Package localapi is the agent's local API: HTTP with JSON bodies over a Unix socket in the
// runtime directory, for the CLI and the gateway's own applications. It holds the server's
// routes (Server), the client the CLI uses (Client), the wire types and the socket; it is
// HTTP only. The agent's lifecycle is reached through the Agent interface, the hub session
// through the Gateway interface (package gateway implements it), both declared here.
//
// Routes:
//
//	GET   /v1/status                    the agent's status
//	POST  /v1/reprovision[?force=1][&provision=1]
//	                                    a registration; the reply streams the status as JSON
//	                                    lines and ends with the assignment or the error
//	POST  /v1/telemetry                 send a telemetry message through the hub session
//	GET   /v1/twin                      the device twin
//	PATCH /v1/twin/reported             patch reported properties (not the agent's own key)
//	GET   /v1/events?c2d=1&desired=1&method=NAME...
//	                                    stream of cloud-to-device messages, desired-property
//	                                    updates and calls of the methods registered, as JSON lines
//	POST  /v1/methods/{id}/response     answer a method call received on the stream
package localapi
