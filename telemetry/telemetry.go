// Package telemetry takes applications' telemetry from their hands to the hub, by way of the
// disk: Submit stores a message in the spool, durably, and Forward moves stored messages into
// the hub session's queue and removes each from the spool once the hub has acknowledged it
// (PUBACK). Delivery is at least once and in submission order, each message keeping its
// "$.mid" (Submit gives one to a message without), so that a back end can drop duplicates.
// A message survives reconnects, a change of hub, restarts and power cuts; the fsync
// discipline behind that is the spool's (see package spool).
//
// # Answering the application
//
// Submit's errors are for the local API to branch on with errors.Is, in this order:
//
//   - ErrInvalid: 400. The message is malformed (an empty property name).
//   - ErrTooLarge: 413. The hub takes at most hub.MaxTelemetrySize; the spool a quarter of
//     max_bytes.
//   - ErrFull: 507 Insufficient Storage with Retry-After (RetryAfter). The spool is at
//     max_bytes under when_full = "refuse-new", or the file system is full. Nothing was stored.
//   - ErrDropped: 507. Stored, then removed while Submit waited for the PUBACK: dropped to
//     make room under when_full = "drop-oldest", expired past max_age, or unreadable. One
//     already in the hub queue may still arrive.
//   - ErrNotConfirmed: 202 Accepted, with the receipt's MID. Stored, and it will be sent, but
//     no PUBACK came within the wait (or the agent is stopping). An error status would have
//     the application send the message again: a duplicate.
//   - ErrClosed: 503. The agent is stopping; nothing was stored.
//   - context.DeadlineExceeded: 504, context.Canceled: 503. The request ended before the
//     message was known to be stored: it may or may not have been. The answer carries the
//     receipt's MID, so that a retry under it makes at worst a duplicate the back end drops.
//   - anything else: 500. The medium failed; nothing was stored.
//
// Success is 200 {"delivered": true} after the PUBACK when Submit waited (?wait= other than
// 0), 202 once durable with wait 0 (?wait=0).
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/clock"
	"github.com/unicity-iot/unicity/internal/uuid"
	"github.com/unicity-iot/unicity/spool"
)

// RetryAfter is what the local API answers in Retry-After with ErrFull. Room comes back only
// as the hub acknowledges messages: when the spool is full the link has usually been down a
// while, and an application that retries sooner only wakes the gateway for another refusal.
const RetryAfter = 30 * time.Second

// Sentinels callers branch on with errors.Is; see the package comment for what the local
// API answers to each. The spool's own sentinels (spool.ErrFull, ...) match too.
var (
	ErrInvalid      = errors.New("invalid telemetry message")
	ErrTooLarge     = errors.New("telemetry message too large")
	ErrFull         = errors.New("telemetry store full")
	ErrDropped      = errors.New("telemetry message removed unsent")
	ErrNotConfirmed = errors.New("telemetry message stored, not yet acknowledged by the hub (it stays queued)")
	ErrClosed       = errors.New("telemetry store closed")
)

// Options are the [telemetry] table of the agent's configuration, key for key; the zero
// value of each but Dir takes the spool's default, for a gateway with little flash.
type Options struct {
	// Dir is the spool directory; the configuration's default is "<state dir>/telemetry".
	Dir string `toml:"dir"`
	// MaxBytes bounds the spool's files; 0: spool.DefaultMaxBytes (16 MiB), at least
	// spool.MinMaxBytes.
	MaxBytes int64 `toml:"max_bytes"`
	// MaxAge removes older messages unsent; 0: spool.DefaultMaxAge (7 days, IoT Hub's own
	// longest retention).
	MaxAge time.Duration `toml:"max_age"`
	// WhenFull is "refuse-new" (the default: ErrFull, nothing stored is lost) or
	// "drop-oldest" (the oldest messages make room, counted in Stats.Dropped).
	WhenFull spool.Policy `toml:"when_full"`
	// Clock stamps and ages messages and times waits; nil: the system clock.
	Clock clock.Clock `toml:"-"`
}

// Store is the telemetry on its way to the hub: submitted by any number of goroutines,
// forwarded by one Forward at a time.
type Store struct {
	spool *spool.Spool
	clock clock.Clock

	forwarding chan struct{} // holds a token while a Forward runs
	rejected   atomic.Int64
}

// Open opens (creating it if need be) the spool in o.Dir and recovers what a crash left in
// it. One process at a time has it open: another gets an error matching spool.ErrLocked.
func Open(o Options) (*Store, error) {
	if o.Dir == "" {
		return nil, errors.New("telemetry: no spool directory")
	}
	if o.Clock == nil {
		o.Clock = clock.System{}
	}
	sp, err := spool.Open(o.Dir, spool.Options{MaxBytes: o.MaxBytes, MaxAge: o.MaxAge, WhenFull: o.WhenFull, Clock: o.Clock})
	if err != nil {
		return nil, err
	}
	return &Store{spool: sp, clock: o.Clock, forwarding: make(chan struct{}, 1)}, nil
}

// Close waits for submissions being written, saves the spool's state and closes it. A
// Forward running returns ErrClosed; Submits waiting for a PUBACK return ErrNotConfirmed.
func (s *Store) Close() error { return s.spool.Close() }

// Receipt is what Submit tells the application.
type Receipt struct {
	// MID is the message's "$.mid": the application's own, or the one Submit gave it. Empty
	// when Submit refused the message; set when the message is stored, or may be (the
	// context ended first), so that the application can send it again under the same MID.
	MID string
	// Delivered: the hub acknowledged the message before Submit returned.
	Delivered bool
}

// Submit stores m, from application app, and returns once it is durable. With wait above
// zero it then waits, up to wait, for the hub's PUBACK. A message without "$.mid" gets a
// random UUID, before it is stored, so that every copy the hub receives carries the same.
// Errors: see the package comment.
func (s *Store) Submit(ctx context.Context, app string, m hub.Message, wait time.Duration) (Receipt, error) {
	props := maps.Clone(m.Properties)
	if props[hub.PropMessageID] == "" {
		if props == nil {
			props = make(map[string]string, 1)
		}
		props[hub.PropMessageID] = uuid.New()
	}
	m.Properties = props
	// The forwarder would meet a message the hub refuses again and again: refuse it now.
	if err := m.Validate(); err != nil {
		if errors.Is(err, hub.ErrTooLarge) {
			return Receipt{}, kind(ErrTooLarge, err)
		}
		return Receipt{}, kind(ErrInvalid, err)
	}
	r := Receipt{MID: props[hub.PropMessageID]}
	id, err := s.spool.Append(ctx, spool.Message{App: app, Properties: m.Properties, Payload: m.Payload})
	switch {
	case errors.Is(err, spool.ErrFull):
		return Receipt{}, kind(ErrFull, err)
	case errors.Is(err, spool.ErrTooLarge):
		return Receipt{}, kind(ErrTooLarge, err)
	case errors.Is(err, spool.ErrClosed):
		return Receipt{}, kind(ErrClosed, err)
	case err != nil && ctx.Err() != nil:
		return r, err // perhaps stored: the MID lets the application send it again as itself
	case err != nil:
		return Receipt{}, err
	case wait <= 0:
		return r, nil
	}
	switch err := s.awaitAck(ctx, id, wait); {
	case err == nil:
		r.Delivered = true
		return r, nil
	case errors.Is(err, spool.ErrDropped) || errors.Is(err, spool.ErrExpired):
		return r, kind(ErrDropped, err)
	default:
		return r, fmt.Errorf("%w: %w", ErrNotConfirmed, err)
	}
}

// awaitAck waits for message id's PUBACK, up to wait on the store's clock.
func (s *Store) awaitAck(ctx context.Context, id spool.ID, wait time.Duration) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	timeout := s.clock.After(wait)
	go func() {
		select {
		case <-timeout:
			cancel(fmt.Errorf("no PUBACK within %s", wait))
		case <-ctx.Done():
		}
	}()
	return s.spool.AwaitAck(ctx, id)
}

// Stats is what the status and the twin show of the telemetry on its way.
type Stats struct {
	// Stats are the spool's figures: Messages (the depth: stored and not acknowledged),
	// InFlight (taken by Forward and not acknowledged: in the hub queue, or the one message
	// waiting for room in it), Bytes, OldestAge, Dropped, Expired, Torn, SetAside, Written.
	spool.Stats
	// Rejected counts, since Open, stored messages the hub queue refused for good (too large,
	// malformed: stored by a version with other limits), removed unsent rather than holding
	// up the rest.
	Rejected int64
}

// Stats returns the figures now.
func (s *Store) Stats() Stats {
	return Stats{Stats: s.spool.Stats(), Rejected: s.rejected.Load()}
}

// kinded is an error that matches a sentinel of this package besides its own chain, and
// reads as its own message alone.
type kinded struct{ kind, err error }

func kind(k, err error) error     { return &kinded{k, err} }
func (e *kinded) Error() string   { return e.err.Error() }
func (e *kinded) Unwrap() []error { return []error{e.kind, e.err} }
