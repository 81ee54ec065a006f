// Package config is the agent's configuration file (shared/design.md "Configuration"): its
// TOML tables and defaults, reading and checking it (Load, Parse), the *Error that locates a
// problem by file, line and key, and the checks of what it names on the host (HostChecks).
// cmd/unicity, the agent (device) and the local API read it; none of them parses TOML.
package config
