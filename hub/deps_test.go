package hub_test

import (
	"testing"

	"github.com/unicity-iot/unicity/internal/archtest"
)

// TestNoTPMInSessions: dps and hub take a tls.Certificate or a symmetric key, never a TPM, so
// neither links the TPM stack, nor attest, which does; SAS tokens come from package sas.
func TestNoTPMInSessions(t *testing.T) {
	archtest.NotLinked(t, []string{"github.com/unicity-iot/unicity/dps", "github.com/unicity-iot/unicity/hub"},
		"github.com/google/go-tpm",
		"github.com/google/go-tpm-tools",
		"github.com/foxboron/go-tpm-keyfiles",
		"github.com/unicity-iot/unicity/attest",
	)
}
