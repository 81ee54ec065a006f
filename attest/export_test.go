package attest

import (
	"context"
	"time"
)

// OpenTPMWithTimeout is OpenTPM with another deadline per command, so that tests of a TPM
// that does not answer need not wait CommandTimeout.
func OpenTPMWithTimeout(ctx context.Context, spec string, timeout time.Duration) (*TPM, error) {
	return openTPM(ctx, spec, timeout)
}
