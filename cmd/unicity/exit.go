package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/cli"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/storage"
)

// Exit codes of the contract (shared/design.md), sysexits-style. Scripts and the systemd unit
// (RestartPreventExitStatus=78) depend on them; change them only with a changelog line.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitUnavailable = 69 // network, DNS, TLS to the endpoint
	exitTempFail    = 75 // throttled, timed out, retry later
	exitRefused     = 77 // enrollment missing or disabled, certificate rejected
	exitConfig      = 78 // bad config, no TPM, key/cert mismatch, expired certificate
)

// exitError carries an exit code chosen by a command for an error no package classifies.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func usageErrorf(format string, a ...any) error { return cli.Usagef(format, a...) }

func configErrorf(format string, a ...any) error {
	return &exitError{code: exitConfig, err: fmt.Errorf(format, a...)}
}

// exitCode maps an error to the contract's exit code. Packages mark what callers branch on
// with sentinels and typed errors; this is the one place that turns them into numbers.
func exitCode(err error) int {
	var ee *exitError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ee):
		return ee.code
	case cli.IsUsage(err):
		return exitUsage
	case errors.Is(err, attest.ErrTPMUnavailable):
		// Before isIdentityError: a TPM gone for a moment may also say ErrNoTPM.
		return exitTempFail
	case isIdentityError(err):
		return exitConfig
	case isConfigError(err), errors.Is(err, device.ErrIdentity), errors.Is(err, storage.ErrReadOnly):
		// A read-only state directory is how the image was built: a restart cannot fix it.
		return exitConfig
	case errors.Is(err, device.ErrRefused), errors.Is(err, dps.ErrRefused), errors.Is(err, hub.ErrNotAuthorized):
		return exitRefused
	case errors.Is(err, device.ErrUnreachable), errors.Is(err, dial.ErrUnreachable):
		return exitUnavailable
	case errors.Is(err, device.ErrTemporary), isDPSTemporary(err), errors.Is(err, hub.ErrQueueFull), errors.Is(err, hub.ErrTimeout):
		return exitTempFail
	case errors.Is(err, storage.ErrDiskFull):
		// Freeing space fixes it; then the same command succeeds.
		return exitTempFail
	default:
		return exitFailure
	}
}

// report prints err as one line on stderr (usage errors have printed their help already)
// and returns the exit code. Written to the journal, the line has error priority.
func report(err error, stderr io.Writer, journald bool) int {
	code := exitCode(err)
	if code != exitOK {
		prefix := ""
		if journald {
			prefix = journalPrefix(slog.LevelError)
		}
		fmt.Fprintf(stderr, "%sunicity: %v\n", prefix, err)
	}
	return code
}

// isIdentityError reports the attest conditions a restart cannot fix: no TPM, an unusable key
// or certificate, a clock too wrong to check the certificate.
func isIdentityError(err error) bool {
	for _, target := range []error{
		attest.ErrNoTPM, attest.ErrInvalidKey, attest.ErrKeyExists, attest.ErrNVExists,
		attest.ErrInvalidIdentity, attest.ErrKeyMismatch, attest.ErrExpired,
		attest.ErrClockNotSet, attest.ErrBadRegistrationID,
	} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// isConfigError reports a configuration that is missing or invalid.
func isConfigError(err error) bool {
	var ce *config.Error
	return errors.As(err, &ce) || errors.Is(err, config.ErrNotExist)
}

// isDPSTemporary reports a registration that gave up on a temporary failure (throttled,
// server errors, timeouts) or ran out of time before DPS answered at all.
func isDPSTemporary(err error) bool {
	var de *dps.Error
	return (errors.As(err, &de) && de.Temporary()) || errors.Is(err, context.DeadlineExceeded)
}
