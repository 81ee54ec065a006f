package device

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/dps"
)

// Throttling (a temporary *dps.Error with RetryAfter) is only made by dps itself; the
// run_throttled scenario covers it against the emulator.
func TestDPSErrorsAreMarkedForTheLifecycle(t *testing.T) {
	tests := []struct {
		name       string
		err        error
		want       error
		retryAfter time.Duration
	}{
		{"refused", fmt.Errorf("register: %w", &dps.Error{Status: 401, Message: "no enrollment matches this certificate"}), ErrRefused, 0},
		{"another TPM", fmt.Errorf("cannot answer DPS's TPM attestation challenge: %w", attest.ErrNotThisTPM), ErrRefused, 0},
		{"unreachable", fmt.Errorf("%w: dial tcp: connection refused", dps.ErrUnreachable), ErrUnreachable, 0},
		{"cancelled", context.Canceled, context.Canceled, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := markDPSError(tt.err)
			assert.ErrorIs(t, err, tt.want)
			assert.ErrorIs(t, err, tt.err, "the original stays reachable")
			assert.Equal(t, tt.retryAfter, retryAfter(err))
			for _, other := range []error{ErrRefused, ErrUnreachable, ErrTemporary} {
				if !errors.Is(tt.want, other) {
					assert.NotErrorIs(t, err, other)
				}
			}
		})
	}
}
