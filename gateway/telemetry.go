package gateway

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
)

// The applications' telemetry goes through here (POST /v1/telemetry, `unicity send`): into
// the hub sessions' one queue, which every session drains, so that messages queued while
// disconnected or before a re-registration are not lost. A durable queue (package spool)
// takes its place here.

// Enqueue queues a telemetry message without waiting for the hub.
func (g *Gateway) Enqueue(m hub.Message) error {
	_, err := g.Hubs.Queue.Enqueue(m)
	return err
}

// Send queues a telemetry message and returns once the hub has acknowledged it.
func (g *Gateway) Send(ctx context.Context, m hub.Message) error {
	return g.Hubs.Queue.Send(ctx, m)
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
