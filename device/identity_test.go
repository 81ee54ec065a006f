package device

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/attest"
)

func TestIdentityErrorsNeedingAPersonAreMarked(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		fatal bool
	}{
		{"no TPM device node", fmt.Errorf("%w at /dev/tpmrm0: %w", attest.ErrNoTPM, fs.ErrNotExist), true},
		{"swtpm not listening yet", fmt.Errorf("%w at swtpm:127.0.0.1:2321: connection refused", attest.ErrNoTPM), false},
		{"TPM self-test running", fmt.Errorf("%w: cannot load: %w", attest.ErrInvalidKey, tpm2.TPMRCTesting), false},
		{"TPM busy", fmt.Errorf("cannot load key: %w", tpm2.TPMRCRetry), false},
		{"keyfile of another TPM", fmt.Errorf("%w: the TPM refused the keyfile: %w", attest.ErrInvalidKey, tpm2.TPMRCIntegrity), true},
		{"certificate of another key", fmt.Errorf("%w: issued for another key", attest.ErrKeyMismatch), true},
		{"expired", fmt.Errorf("%w: valid until yesterday", attest.ErrExpired), true},
		{"bad CN", fmt.Errorf("certificate CN: %w", attest.ErrBadRegistrationID), true},
		{"no certificate file", fmt.Errorf("%w: %w", attest.ErrInvalidIdentity, fs.ErrNotExist), true},
		{"clock", fmt.Errorf("%w: 1970", attest.ErrClockNotSet), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classifyIdentityError(tt.err)
			assert.Equal(t, tt.fatal, errors.Is(err, ErrIdentity))
			assert.ErrorIs(t, err, tt.err)
			assert.Equal(t, tt.err.Error(), err.Error())
		})
	}
}
