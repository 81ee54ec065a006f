package device

import (
	"errors"
	"fmt"
	"time"
)

// What the lifecycle, the local API and cmd/unicity branch on. The adapters over dps and hub
// mark their packages' errors with these, so the policy here does not depend on how either
// package spells a refusal.
var (
	// ErrRefused: DPS refused the device for good (no enrollment, disabled, certificate
	// rejected, CN mismatch). Retrying soon cannot help; the agent parks.
	ErrRefused = errors.New("refused by the service")
	// ErrUnreachable: the endpoint could not be reached (DNS, TCP, TLS).
	ErrUnreachable = errors.New("service unreachable")
	// ErrTemporary: the service asked to come back later (throttled, busy, timed out).
	ErrTemporary = errors.New("temporary failure")
	// ErrIdentityRejected: the hub refused this identity (CONNACK 4/5: device deleted,
	// disabled, or moved to another hub). The cure is a new registration with DPS.
	ErrIdentityRejected = errors.New("the hub refused the device identity")
	// ErrRateLimited: a registration was asked for sooner than the configured interval
	// after the last one.
	ErrRateLimited = errors.New("registered too recently")
	// ErrIdentity: the device identity (TPM, key, certificate) cannot be used as configured.
	ErrIdentity = errors.New("device identity unusable")
)

// marked is err, also matching mark with errors.Is, with err's message unchanged.
type marked struct {
	err, mark error
}

func (e *marked) Error() string   { return e.err.Error() }
func (e *marked) Unwrap() []error { return []error{e.err, e.mark} }

// Mark returns err so that errors.Is(err, kind) holds, without changing its message.
func Mark(err, kind error) error {
	if err == nil || errors.Is(err, kind) {
		return err
	}
	return &marked{err: err, mark: kind}
}

// RetryAfterError is a failure the service said when to retry after.
type RetryAfterError struct {
	After time.Duration
	Err   error
}

func (e *RetryAfterError) Error() string {
	return fmt.Sprintf("%v (retry after %s)", e.Err, e.After)
}

func (e *RetryAfterError) Unwrap() error { return e.Err }

// RateLimitError is a registration refused because the last one, at Last, is more recent
// than [agent] reprovision_interval; Next is when one is allowed again. It matches
// ErrRateLimited and ErrTemporary.
type RateLimitError struct {
	Last, Next time.Time
	Interval   time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("%v: last registration at %s; the next is allowed at %s (agent.reprovision_interval = %s), or use --force",
		ErrRateLimited, e.Last.UTC().Format(time.RFC3339), e.Next.UTC().Format(time.RFC3339), e.Interval)
}

func (e *RateLimitError) Unwrap() []error { return []error{ErrRateLimited, ErrTemporary} }

func retryAfter(err error) time.Duration {
	var ra *RetryAfterError
	if errors.As(err, &ra) {
		return ra.After
	}
	return 0
}

// RetryAfter is how long after now a failed registration may be asked for again, when
// known: the rate limit's next slot, or the wait DPS asked for.
func RetryAfter(err error, now time.Time) time.Duration {
	var rl *RateLimitError
	if errors.As(err, &rl) {
		return rl.Next.Sub(now)
	}
	return retryAfter(err)
}
