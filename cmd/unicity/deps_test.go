package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoSimulatorInAgent keeps the cgo TPM simulator (test-only) out of the shipped binary,
// which must build with CGO_ENABLED=0 for every gateway architecture, and the DPS emulator,
// which holds DPS's side of TPM attestation.
func TestNoSimulatorInAgent(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 50 {
		t.Fatalf("go list -deps listed only %d packages: %q", len(deps), deps)
	}
	for _, denied := range []string{
		"github.com/google/go-tpm-tools/simulator",
		"github.com/google/go-tpm/tpm2/transport/simulator",
		"github.com/unicity-iot/unicity/attest/attesttest",
		"github.com/unicity-iot/unicity/dps/dpstest",
	} {
		for _, d := range deps {
			if d == denied || strings.HasPrefix(d, denied+"/") {
				t.Errorf("cmd/unicity links %s", d)
			}
		}
	}
}
