package main

import (
	"testing"

	"github.com/unicity-iot/unicity/internal/archtest"
)

// TestNoTestCodeInAgent keeps what only tests and the emulator need out of the shipped
// binary: the cgo TPM simulator (the agent must build with CGO_ENABLED=0 for every gateway
// architecture), the CA factory (the agent reads certificates; it never makes them) and the
// DPS emulator, which holds DPS's side of TPM attestation.
func TestNoTestCodeInAgent(t *testing.T) {
	archtest.NotLinked(t, []string{"github.com/unicity-iot/unicity/cmd/unicity"},
		"github.com/google/go-tpm-tools/simulator",
		"github.com/google/go-tpm/tpm2/transport/simulator",
		"github.com/unicity-iot/unicity/attest/attesttest",
		"github.com/unicity-iot/unicity/internal/pki",
		"github.com/unicity-iot/unicity/dps/dpstest",
		"github.com/unicity-iot/unicity/internal/archtest",
	)
}
