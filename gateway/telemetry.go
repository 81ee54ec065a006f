package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/telemetry"
)

// The applications' telemetry goes through here (POST /v1/telemetry, `unicity send`): into
// the on-disk store ([telemetry] in the configuration), which forwards it into the hub
// sessions' one queue for as long as the agent runs. That queue outlives each session, so
// that reconnects, a move to another hub and a renewal carry on with the same messages.

// storeRetry is how long the gateway waits before opening the store again, or forwarding
// again after the store failed.
const storeRetry = 10 * time.Second

var errClockNotValid = errors.New("waiting for a valid clock: a message stored now would be dated wrongly")

// runTelemetry opens the store once the agent has found the clock valid, forwards it into
// the hub queue until ctx ends, and closes it.
func (g *Gateway) runTelemetry(ctx context.Context) {
	if !g.awaitValidClock(ctx) {
		return
	}
	opts := g.Hubs.Config.Telemetry
	opts.Clock = g.clock()
	var store *telemetry.Store
	for {
		var err error
		if store, err = telemetry.Open(opts); err == nil {
			break
		}
		g.setStoreProblem(fmt.Errorf("telemetry queue %s: %w", opts.Dir, err))
		select {
		case <-g.clock().After(storeRetry):
		case <-ctx.Done():
			return
		}
	}
	g.mu.Lock()
	g.store, g.storeProblem = store, nil
	g.mu.Unlock()
	defer store.Close() // Submits waiting for a PUBACK answer that it stays queued
	for {
		err := store.Forward(ctx, g.Hubs.Queue)
		if ctx.Err() != nil {
			return
		}
		g.Agent.NoteError(fmt.Errorf("telemetry queue: %w", err))
		select {
		case <-g.clock().After(storeRetry):
		case <-ctx.Done():
			return
		}
	}
}

// awaitValidClock waits until the agent's phase is past waiting for a valid clock (the
// spool dates each message at Append and ages it from then).
func (g *Gateway) awaitValidClock(ctx context.Context) bool {
	updates, cancel := g.Agent.Subscribe()
	defer cancel()
	g.setStoreProblem(errClockNotValid)
	s := g.Agent.Status()
	for !clockJudged(s.Phase) {
		select {
		case s = <-updates:
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// clockJudged: the agent has checked the clock against the identity before these phases.
func clockJudged(p device.Phase) bool {
	switch p {
	case device.PhaseProvisioning, device.PhaseParked, device.PhaseConnecting, device.PhaseConnected:
		return true
	}
	return false
}

func (g *Gateway) setStoreProblem(err error) {
	g.mu.Lock()
	g.storeProblem = err
	g.mu.Unlock()
	if err != errClockNotValid {
		g.Agent.NoteError(err)
	}
}

func (g *Gateway) clock() device.Clock {
	if g.Clock == nil {
		return device.SystemClock{}
	}
	return g.Clock
}

// Submit stores an application's message and, with wait above zero, waits up to wait for
// the hub's PUBACK (see package telemetry). Before the store is open it refuses with an
// error marked localapi.ErrNotReady.
func (g *Gateway) Submit(ctx context.Context, app string, m hub.Message, wait time.Duration) (telemetry.Receipt, error) {
	g.mu.Lock()
	store, problem := g.store, g.storeProblem
	g.mu.Unlock()
	if store == nil {
		if problem == nil {
			problem = errors.New("the telemetry queue is not open yet")
		}
		return telemetry.Receipt{}, device.Mark(problem, localapi.ErrNotReady)
	}
	return store.Submit(ctx, app, m, wait)
}

// TelemetryStatus is the queue's figures, or why it is not open.
func (g *Gateway) TelemetryStatus() *device.TelemetryStatus {
	opts := g.Hubs.Config.Telemetry
	g.mu.Lock()
	store, problem := g.store, g.storeProblem
	g.mu.Unlock()
	ts := &device.TelemetryStatus{MaxBytes: opts.MaxBytes, WhenFull: opts.WhenFull.String()}
	if store == nil {
		if problem == nil {
			problem = errors.New("not open yet")
		}
		ts.Problem = problem.Error()
		return ts
	}
	st := store.Stats()
	ts.Messages, ts.InFlight, ts.Bytes = st.Messages, st.InFlight, st.Bytes
	ts.OldestAgeSeconds = int64(st.OldestAge / time.Second)
	ts.Dropped, ts.Expired, ts.Rejected, ts.Torn = st.Dropped, st.Expired, st.Rejected, st.Torn
	return ts
}

// Twin is the device twin, read through the live session.
func (g *Gateway) Twin(ctx context.Context) (hub.Twin, error) {
	c := g.Hubs.Client()
	if c == nil {
		return hub.Twin{}, ErrNoSession
	}
	return c.Twin(ctx)
}

// UpdateReported patches the reported properties for an application; ReportedKey is the
// agent's own and refused (marked localapi.ErrBadRequest).
func (g *Gateway) UpdateReported(ctx context.Context, patch map[string]json.RawMessage) (int64, error) {
	if _, ok := patch[ReportedKey]; ok {
		return 0, device.Mark(fmt.Errorf("%q is the agent's own reported property", ReportedKey), localapi.ErrBadRequest)
	}
	c := g.Hubs.Client()
	if c == nil {
		return 0, ErrNoSession
	}
	body, err := json.Marshal(patch)
	if err != nil {
		return 0, err
	}
	return c.UpdateReported(ctx, body)
}
