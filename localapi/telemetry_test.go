package localapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/device/devicetest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/telemetry"
)

// submitter is a gateway whose Submit answers what the test says and notes what it was asked.
type submitter struct {
	localapi.Gateway // the routes other than telemetry are not called

	mu      sync.Mutex
	answer  func(wait time.Duration) (telemetry.Receipt, error)
	app     string
	waited  time.Duration
	message hub.Message
}

func (s *submitter) Submit(_ context.Context, app string, m hub.Message, wait time.Duration) (telemetry.Receipt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.app, s.waited, s.message = app, wait, m
	return s.answer(wait)
}

func (s *submitter) TelemetryStatus() *device.TelemetryStatus {
	return &device.TelemetryStatus{Messages: 3, Bytes: 4096, MaxBytes: 16 << 20, OldestAgeSeconds: 90, WhenFull: "drop-oldest", Dropped: 2, Torn: 1}
}

func serveTelemetry(t *testing.T) (*submitter, *devicetest.Testbed, *http.Client) {
	tb := devicetest.New(t)
	sub := &submitter{}
	ln, err := localapi.Listen(tb.Config)
	require.NoError(t, err)
	srv := &localapi.Server{Agent: tb.Agent, Gateway: sub, Clock: tb.Clock}
	tb.Agent.Services = append(tb.Agent.Services, func(ctx context.Context) { srv.Serve(ctx, ln) })
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	socket := localapi.Socket(tb.Config)
	return sub, tb, &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
}

// TestTelemetryAnswers: each of package telemetry's outcomes gets the status its doc gives,
// with Retry-After where waiting helps and the message ID where the message is, or may be,
// stored.
func TestTelemetryAnswers(t *testing.T) {
	sub, _, c := serveTelemetry(t)
	stored := telemetry.Receipt{MID: "m-1"}
	tests := []struct {
		name       string
		query      string
		receipt    telemetry.Receipt
		err        error
		status     int
		retryAfter string
		answer     localapi.TelemetryAnswer
	}{
		{"delivered", "", telemetry.Receipt{MID: "m-1", Delivered: true}, nil, 200, "", localapi.TelemetryAnswer{Delivered: true, MessageID: "m-1"}},
		{"durable", "?wait=0", stored, nil, 202, "", localapi.TelemetryAnswer{Queued: true, MessageID: "m-1"}},
		{"stored, no PUBACK in time", "?timeout=2s", stored, fmt.Errorf("%w: no PUBACK within 2s", telemetry.ErrNotConfirmed), 202, "", localapi.TelemetryAnswer{Queued: true, MessageID: "m-1"}},
		{"invalid", "", telemetry.Receipt{}, telemetry.ErrInvalid, 400, "", localapi.TelemetryAnswer{Error: telemetry.ErrInvalid.Error()}},
		{"too large", "", telemetry.Receipt{}, telemetry.ErrTooLarge, 413, "", localapi.TelemetryAnswer{Error: telemetry.ErrTooLarge.Error()}},
		{"full", "", telemetry.Receipt{}, telemetry.ErrFull, 507, "30", localapi.TelemetryAnswer{Error: telemetry.ErrFull.Error()}},
		{"dropped while waiting", "", stored, telemetry.ErrDropped, 507, "", localapi.TelemetryAnswer{MessageID: "m-1", Error: telemetry.ErrDropped.Error()}},
		{"not ready", "", telemetry.Receipt{}, device.Mark(errors.New("waiting for a valid clock"), localapi.ErrNotReady), 503, "5", localapi.TelemetryAnswer{Error: "waiting for a valid clock"}},
		{"stopping", "", telemetry.Receipt{}, telemetry.ErrClosed, 503, "", localapi.TelemetryAnswer{Error: telemetry.ErrClosed.Error()}},
		{"ended before stored", "", stored, context.DeadlineExceeded, 504, "", localapi.TelemetryAnswer{MessageID: "m-1", Error: context.DeadlineExceeded.Error()}},
		{"medium failed", "", telemetry.Receipt{}, errors.New("input/output error"), 500, "", localapi.TelemetryAnswer{Error: "input/output error"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sub.mu.Lock()
			sub.answer = func(time.Duration) (telemetry.Receipt, error) { return tt.receipt, tt.err }
			sub.mu.Unlock()
			resp, err := c.Post("http://unicity/v1/telemetry"+tt.query, "application/json", strings.NewReader(`{"payload":1}`))
			require.NoError(t, err)
			defer resp.Body.Close()
			var got localapi.TelemetryAnswer
			require.NoError(t, json.NewDecoder(resp.Body).Decode(&got))
			assert.Equal(t, tt.status, resp.StatusCode)
			assert.Equal(t, tt.retryAfter, resp.Header.Get("Retry-After"))
			assert.Equal(t, tt.answer, got)
		})
	}
}

// TestTelemetryWaitAndApp: ?wait=0 submits without waiting, ?timeout= waits that long (30 s
// by default); the application is X-Unicity-App, else the peer's uid from the socket.
func TestTelemetryWaitAndApp(t *testing.T) {
	sub, _, c := serveTelemetry(t)
	sub.answer = func(time.Duration) (telemetry.Receipt, error) { return telemetry.Receipt{MID: "m"}, nil }
	post := func(query string, header string) int {
		req, err := http.NewRequest("POST", "http://unicity/v1/telemetry"+query, strings.NewReader(`{"payload":{"t":1}}`))
		require.NoError(t, err)
		if header != "" {
			req.Header.Set(localapi.AppHeader, header)
		}
		resp, err := c.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	assert.Equal(t, 202, post("?wait=0", ""))
	assert.Equal(t, time.Duration(0), sub.waited)
	assert.Equal(t, fmt.Sprintf("uid:%d", os.Geteuid()), sub.app)
	assert.JSONEq(t, `{"t":1}`, string(sub.message.Payload))

	post("?timeout=7s", "meter-reader")
	assert.Equal(t, 7*time.Second, sub.waited)
	assert.Equal(t, "meter-reader", sub.app)
	post("", "")
	assert.Equal(t, 30*time.Second, sub.waited)

	assert.Equal(t, 400, post("", "two words"))
	assert.Equal(t, 400, post("", strings.Repeat("a", 65)))
}

// TestStatusShowsTelemetry: GET /v1/status carries the gateway's telemetry queue.
func TestStatusShowsTelemetry(t *testing.T) {
	_, tb, _ := serveTelemetry(t)
	st, err := localapi.NewClient(tb.Config).Status(context.Background())
	require.NoError(t, err)
	require.NotNil(t, st.Telemetry)
	assert.Equal(t, device.TelemetryStatus{Messages: 3, Bytes: 4096, MaxBytes: 16 << 20, OldestAgeSeconds: 90, WhenFull: "drop-oldest", Dropped: 2, Torn: 1}, *st.Telemetry)
}
