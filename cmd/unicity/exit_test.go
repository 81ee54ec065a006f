package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"syscall"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/attest"
)

// TestTPMExitCodes: a TPM busy or gone for a moment is worth a restart (75); a key the TPM
// refuses is not (78, which systemd does not restart).
func TestTPMExitCodes(t *testing.T) {
	tests := []struct {
		name string
		err  error
		code int
	}{
		{"busy", fmt.Errorf("%w: cannot create the storage root key: %w", attest.ErrTPMUnavailable, tpm2.TPMRCRetry), exitTempFail},
		{"swtpm restarting", fmt.Errorf("%w: no key at handle 0x81000001: %w at swtpm:/run/swtpm.sock: %w", attest.ErrTPMUnavailable, attest.ErrNoTPM, syscall.ECONNREFUSED), exitTempFail},
		{"no TPM", fmt.Errorf("%w at /dev/tpmrm0", attest.ErrNoTPM), exitConfig},
		{"keyfile of another TPM", fmt.Errorf("%w: the TPM refused the keyfile: %w", attest.ErrInvalidKey, tpm2.TPMRCIntegrity), exitConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.code, exitCode(fmt.Errorf("cannot load key: %w", tt.err)))
		})
	}
}

// TestUsageExitCode: every way of mistyping a command line exits 2, what scripts test for.
func TestUsageExitCode(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"bogus"},
		{"factory"},
		{"factory", "bogus"},
		{"version", "--no-such-flag"},
		{"version", "extra"},
	} {
		var stdout, stderr bytes.Buffer
		err := run(context.Background(), args, &stdout, &stderr)
		assert.Equal(t, exitUsage, exitCode(err), "unicity %q: %v", args, err)
	}
	assert.Equal(t, exitOK, exitCode(run(context.Background(), []string{"--help"}, io.Discard, io.Discard)))
}
