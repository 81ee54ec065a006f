package localapi_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/device/devicetest"
	"github.com/unicity-iot/unicity/localapi"
)

// The server's goroutines end with the agent's context.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serveAPI gives the testbed's agent its local API socket, served for as long as it runs.
func serveAPI(t *testing.T, tb *devicetest.Testbed) {
	ln, err := localapi.Listen(tb.Config)
	require.NoError(t, err)
	srv := &localapi.Server{Agent: tb.Agent, Clock: tb.Clock}
	tb.Agent.Services = append(tb.Agent.Services, func(ctx context.Context) { srv.Serve(ctx, ln) })
}

func TestReprovisionThroughTheLocalAPI(t *testing.T) {
	tb := devicetest.New(t, devicetest.Assigned("hub-a.example"), devicetest.Assigned("hub-b.example"))
	serveAPI(t, tb)
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)
	first := tb.Hub.Last()

	c := localapi.NewClient(tb.Config)
	ctx := context.Background()
	_, err := c.Reprovision(ctx, false, false, nil)
	require.ErrorIs(t, err, device.ErrTemporary, "rate limited without --force")
	assert.Contains(t, err.Error(), "--force")
	assert.Equal(t, 1, tb.DPS.Calls())

	asg, err := c.Reprovision(ctx, false, true, nil)
	require.NoError(t, err, "provision-only answers with the assignment in force")
	assert.Equal(t, "hub-a.example", asg.AssignedHub)

	var seen []device.Phase
	asg, err = c.Reprovision(ctx, true, false, func(s device.Status) { seen = append(seen, s.Phase) })
	require.NoError(t, err)
	assert.Equal(t, "hub-b.example", asg.AssignedHub)
	assert.NotEmpty(t, seen, "progress is streamed")
	require.Eventually(t, func() bool { return tb.Hub.Last() != first && tb.Agent.Status().Phase == device.PhaseConnected }, 5*time.Second, time.Millisecond)
	assert.Equal(t, "hub-b.example", tb.Agent.Status().AssignedHub)
	assert.True(t, first.Closed.Load(), "the old session is closed once the new assignment is stored")

	got, err := c.Status(ctx)
	require.NoError(t, err)
	assert.Equal(t, device.PhaseConnected, got.Phase)

	require.NoError(t, tb.Stop())
	_, err = c.Status(ctx)
	require.ErrorIs(t, err, localapi.ErrNotRunning)
}

// postReprovision posts to the agent's /v1/reprovision over its socket.
func postReprovision(t *testing.T, cfg *config.Config, query string) (*http.Response, string) {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", localapi.Socket(cfg))
	}}, Timeout: 10 * time.Second}
	resp, err := c.Post("http://unicity/v1/reprovision"+query, "", nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(body)
}

// TestReprovisionAPIStatuses: an answer the agent gives before it registers comes whole with
// its HTTP status (429 and Retry-After when rate-limited, 400 for a bad parameter, 503 while
// it cannot register); a registration under way is 200 with its progress streamed.
func TestReprovisionAPIStatuses(t *testing.T) {
	tb := devicetest.New(t, devicetest.Assigned("hub-a.example"), devicetest.Assigned("hub-b.example"))
	serveAPI(t, tb)
	tb.Start()
	tb.WaitPhase(device.PhaseConnected)

	resp, body := postReprovision(t, tb.Config, "")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, body)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	retry, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	require.NoError(t, err, "Retry-After: %q", resp.Header.Get("Retry-After"))
	assert.InDelta(t, tb.Config.Agent.ReprovisionInterval.Seconds(), retry, 2)
	assert.Contains(t, body, `"error":"registered too recently: `)
	assert.Contains(t, body, `"kind":"temporary"`)

	resp, body = postReprovision(t, tb.Config, "?force=yes")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	assert.Contains(t, body, `"error":"force: want 1 or 0, not \"yes\""`)
	assert.Equal(t, 1, tb.DPS.Calls(), "no registration for refused requests")

	resp, body = postReprovision(t, tb.Config, "?force=1")
	assert.Equal(t, http.StatusOK, resp.StatusCode, body)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	lines := strings.Split(strings.TrimSpace(body), "\n")
	assert.Contains(t, lines[0], `"status":`, "progress first")
	assert.Contains(t, lines[len(lines)-1], `"assignment":{"registration_id":"gw-0001","assigned_hub":"hub-b.example"`)
	require.NoError(t, tb.Stop())

	// Waiting for a valid clock, the agent cannot register: 503, at once.
	tb = devicetest.New(t)
	tb.Clock.Set(time.Unix(0, 0))
	serveAPI(t, tb)
	tb.Start()
	tb.WaitPhase(device.PhaseWaitingClock)
	resp, body = postReprovision(t, tb.Config, "?force=1")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, body)
	assert.Contains(t, body, `"error":"the agent is waiting for a valid clock","kind":"temporary"`)
}

func TestParkedAgentRegistersOnRequest(t *testing.T) {
	refused := device.Mark(errors.New("no enrollment"), device.ErrRefused)
	tb := devicetest.New(t, devicetest.Failing(refused), devicetest.Assigned("hub-a.example"))
	serveAPI(t, tb)
	tb.Start()
	tb.WaitPhase(device.PhaseParked)
	asg, err := localapi.NewClient(tb.Config).Reprovision(context.Background(), false, false, nil)
	require.NoError(t, err)
	assert.Equal(t, "hub-a.example", asg.AssignedHub)
	tb.WaitPhase(device.PhaseConnected)
}
