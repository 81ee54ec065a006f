package localapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
)

// Client talks to a running agent over the local API socket.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the agent configured by cfg.
func NewClient(cfg *config.Config) *Client {
	path := Socket(cfg)
	return &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
				return nil, fmt.Errorf("%w (no agent at %s)", ErrNotRunning, path)
			}
			return c, err
		},
	}}}
}

// do makes a request. An answer other than 200 is returned as an error: the agent's own
// words and kind when its body carries them.
func (c *Client) do(ctx context.Context, method, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://unicity"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	var answer progressLine
	if json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&answer) == nil && answer.Error != "" {
		return nil, errorOfKind(answer.Error, answer.Kind)
	}
	return nil, fmt.Errorf("agent answered %s to %s %s", resp.Status, method, path)
}

// Status asks the running agent for its status. ErrNotRunning when no agent answers.
func (c *Client) Status(ctx context.Context) (*device.Status, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var s device.Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("cannot read the agent's status: %w", err)
	}
	return &s, nil
}

// Reprovision asks the running agent to register again (or, with provisionOnly, to register
// only if it has no assignment) and returns the assignment in force afterwards. progress
// receives the agent's status changes meanwhile. ErrNotRunning when no agent answers.
func (c *Client) Reprovision(ctx context.Context, force, provisionOnly bool, progress func(device.Status)) (*Assignment, error) {
	path := "/v1/reprovision?force=" + boolParam(force) + "&provision=" + boolParam(provisionOnly)
	resp, err := c.do(ctx, http.MethodPost, path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	last := ""
	for sc.Scan() {
		var line progressLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return nil, fmt.Errorf("cannot read the agent's answer: %w", err)
		}
		switch {
		case line.Status != nil:
			last = line.Status.Message
			if progress != nil {
				progress(*line.Status)
			}
		case line.Assignment != nil:
			return line.Assignment, nil
		case line.Error != "":
			return nil, errorOfKind(line.Error, line.Kind)
		}
	}
	if ctx.Err() != nil {
		// The agent goes on with the registration; only this wait for it ends.
		return nil, device.Mark(fmt.Errorf("no answer from the agent in time (it goes on; see `unicity status`): %s", last), device.ErrTemporary)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("cannot read the agent's answer: %w", err)
	}
	return nil, device.Mark(errors.New("the agent stopped before answering"), device.ErrTemporary)
}

func boolParam(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// SendTelemetry sends one telemetry message through the running agent. With wait above zero
// it returns once the hub has acknowledged it (Delivered), or once the agent has it stored
// when no acknowledgement came within wait (Queued: the agent sends it later); with wait 0,
// once stored. A full queue, an agent not ready or stopping, and no answer in time are
// marked device.ErrTemporary, no agent device.ErrUnreachable.
func (c *Client) SendTelemetry(ctx context.Context, payload []byte, props map[string]string, wait time.Duration) (TelemetryAnswer, error) {
	body, err := json.Marshal(TelemetryRequest{PayloadBase64: payload, Properties: props})
	if err != nil {
		return TelemetryAnswer{}, err
	}
	path := "/v1/telemetry?wait=0"
	if wait > 0 {
		path = "/v1/telemetry?timeout=" + url.QueryEscape(wait.String())
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://unicity"+path, bytes.NewReader(body))
	if err != nil {
		return TelemetryAnswer{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.Is(err, ErrNotRunning) && errors.As(err, &ue) {
			return TelemetryAnswer{}, device.Mark(ue.Err, device.ErrUnreachable) // no agent: the request itself says nothing
		}
		return TelemetryAnswer{}, err
	}
	defer resp.Body.Close()
	var answer TelemetryAnswer
	decodeErr := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&answer)
	switch resp.StatusCode {
	case http.StatusOK, http.StatusAccepted:
		if decodeErr != nil {
			return TelemetryAnswer{}, fmt.Errorf("cannot read the agent's answer: %w", decodeErr)
		}
		return answer, nil
	case http.StatusInsufficientStorage:
		return answer, device.Mark(fmt.Errorf("telemetry queue full (agent answered %s): %s", resp.Status, answer.Error), device.ErrTemporary)
	case http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return answer, device.Mark(fmt.Errorf("agent answered %s: %s", resp.Status, answer.Error), device.ErrTemporary)
	}
	return answer, fmt.Errorf("agent answered %s: %s", resp.Status, answer.Error)
}
