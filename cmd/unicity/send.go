package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
)

// properties collects repeated --property k=v flags.
type properties map[string]string

func (p properties) String() string { return "" }

func (p properties) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", s)
	}
	p[k] = v
	return nil
}

// sendReport is `unicity send --json`.
type sendReport struct {
	Delivered bool `json:"delivered"`
	// Queued: the agent has it stored and sends it later (no acknowledgement within
	// --timeout, or --timeout 0).
	Queued    bool   `json:"queued,omitempty"`
	MessageID string `json:"message_id"`
	Bytes     int    `json:"bytes"`
}

// runSend sends stdin as one telemetry message through the running agent's telemetry queue
// and returns once the hub has acknowledged it, or once the agent has it stored when no
// acknowledgement comes within --timeout (it is sent later: sending it again would make a
// duplicate). The message carries a message ID ($.mid), one made up when none is given, so
// that it can be found on the cloud side and duplicates dropped.
func runSend(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "send", "[--config FILE] [--property NAME=VALUE]... [--timeout D] [--json] < payload")
	var tf tpmFlags
	tf.register(fs)
	props := properties{}
	fs.Var(props, "property", "message property `NAME=VALUE` (repeatable); system properties by their wire names, e.g. '$.ct=application/json'")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the hub's acknowledgement (0: only until the agent has stored the message); a stored message is sent even when it does not come in time")
	out := e.jsonFlag(fs, "print the outcome as one JSON object")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := tf.loadConfig(fs, false)
	if err != nil {
		return err
	}
	payload, err := io.ReadAll(io.LimitReader(e.stdin, hub.MaxTelemetrySize+1))
	if err != nil {
		return fmt.Errorf("cannot read the payload from stdin: %w", err)
	}
	if len(payload) > hub.MaxTelemetrySize {
		return usageErrorf("send: the payload exceeds the hub's limit of %d bytes", hub.MaxTelemetrySize)
	}
	if props[hub.PropMessageID] == "" {
		props[hub.PropMessageID] = rand.Text()
	}
	// The agent bounds the wait by --timeout; this bounds a wedged agent.
	ctx, cancel := context.WithTimeout(ctx, *timeout+10*time.Second)
	defer cancel()
	if *timeout < 0 {
		return usageErrorf("send: --timeout must not be negative")
	}
	answer, err := localapi.NewClient(cfg).SendTelemetry(ctx, payload, props, *timeout)
	if err != nil {
		return fmt.Errorf("cannot send: %w", err)
	}
	r := sendReport{Delivered: answer.Delivered, Queued: answer.Queued, MessageID: props[hub.PropMessageID], Bytes: len(payload)}
	if out.on {
		return out.print(r)
	}
	if r.Delivered {
		_, err = fmt.Fprintf(e.stdout, "delivered: message %s, %d bytes, acknowledged by the hub\n", r.MessageID, r.Bytes)
	} else {
		_, err = fmt.Fprintf(e.stdout, "queued: message %s, %d bytes, stored by the agent; it sends it once the hub is reachable\n", r.MessageID, r.Bytes)
	}
	return err
}
