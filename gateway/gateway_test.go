package gateway_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/device/devicetest"
	"github.com/unicity-iot/unicity/gateway"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/spool"
	"github.com/unicity-iot/unicity/storage"
)

// The relay's goroutines, the hub session's and the local API's end with the agent.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// gatewayBed is the agent with its gateway, connected to an emulated hub over real TLS, with
// the local API on a Unix socket.
type gatewayBed struct {
	*devicetest.Testbed
	srv     *hubtest.Server
	gateway *gateway.Gateway
	api     *localapi.Client
	http    *http.Client // to the local API socket
}

func newGatewayBed(t *testing.T) *gatewayBed {
	gb := startGatewayBed(t, nil)
	gb.WaitPhase(device.PhaseConnected)
	return gb
}

// startGatewayBed starts the agent and its gateway, after prepare (when set) has changed
// the testbed.
func startGatewayBed(t *testing.T, prepare func(*devicetest.Testbed)) *gatewayBed {
	return startGatewayBedAs(t, prepare, nil)
}

// startGatewayBedAs is startGatewayBed with the gateway seeing the agent through as (when
// set).
func startGatewayBedAs(t *testing.T, prepare func(*devicetest.Testbed), as func(*device.Agent) gateway.Agent) *gatewayBed {
	srv := hubtest.NewServer(t)
	// DPS keeps assigning the same hub, so a re-registration lands back on it.
	tb := devicetest.New(t, devicetest.Assigned(srv.Name()))
	if prepare != nil {
		prepare(tb)
	}
	require.NoError(t, srv.Register(hubtest.Device{ID: "gw-0001", Thumbprints: []string{certcodec.Thumbprint(tb.Leaf.Certificate())}}))
	hubs := device.NewHubSessions(tb.Config, srv.RootCAs())
	tb.Agent.Hub = hubs
	ln, err := localapi.Listen(tb.Config)
	require.NoError(t, err)
	var agent gateway.Agent = tb.Agent
	if as != nil {
		agent = as(tb.Agent)
	}
	g := gateway.New(agent, hubs)
	api := &localapi.Server{Agent: tb.Agent, Gateway: g, Clock: tb.Clock}
	tb.Agent.Services = []func(context.Context){g.Run, func(ctx context.Context) { api.Serve(ctx, ln) }}
	tb.Start()
	socket := localapi.Socket(tb.Config)
	return &gatewayBed{Testbed: tb, srv: srv, gateway: g, api: localapi.NewClient(tb.Config),
		http: &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}}}}
}

func (gb *gatewayBed) call(t *testing.T, method, path, body string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, "http://unicity"+path, strings.NewReader(body))
	require.NoError(t, err)
	resp, err := gb.http.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	if out != nil {
		require.NoError(t, json.NewDecoder(resp.Body).Decode(out))
	}
	return resp.StatusCode
}

// postTelemetry posts a message and returns the answer, its headers with it.
func (gb *gatewayBed) postTelemetry(t *testing.T, query, body string) (*http.Response, localapi.TelemetryAnswer) {
	t.Helper()
	resp, err := gb.http.Post("http://unicity/v1/telemetry"+query, "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	var res localapi.TelemetryAnswer
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&res))
	return resp, res
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestGatewayReportsHealth(t *testing.T) {
	gb := newGatewayBed(t)
	var health gateway.Health
	require.NoError(t, gb.srv.Await(ctxFor(t), func() bool {
		tw, err := gb.srv.Twin("gw-0001")
		if err != nil || tw.Reported[gateway.ReportedKey] == nil {
			return false
		}
		b, _ := json.Marshal(tw.Reported[gateway.ReportedKey])
		return json.Unmarshal(b, &health) == nil
	}))
	assert.Equal(t, "gw-0001", health.RegistrationID)
	assert.Equal(t, "gw-0001", health.DeviceID)
	assert.Equal(t, "dev", health.AgentVersion)
	assert.Equal(t, "initialAssignment", health.Substatus)
	assert.Equal(t, "mqtt", health.Transport)
	assert.Equal(t, 1, health.ProvisioningAttempts)
	assert.False(t, health.ProvisionedAt.IsZero())
	assert.WithinDuration(t, gb.Leaf.Certificate().NotAfter, health.CertificateNotAfter, time.Second)
	assert.WithinDuration(t, gb.Leaf.Certificate().NotBefore, health.ValidFrom, time.Second)
	assert.Equal(t, health.CertificateNotAfter, health.ValidUntil)
	assert.Nil(t, health.LastError)
}

// renewingAgent is the agent with the renewal state a test sets: the renewal engine fills
// Status.Renewal in the agent itself.
type renewingAgent struct {
	*device.Agent
	mu         sync.Mutex
	renewal    *device.RenewalStatus
	onboarding *device.OnboardingStatus
}

func (a *renewingAgent) Status() device.Status {
	s := a.Agent.Status()
	a.mu.Lock()
	s.Renewal, s.Onboarding = a.renewal, a.onboarding
	a.mu.Unlock()
	return s
}

// setOnboarding changes the onboarding certificate's trouble, and publishes a status change.
func (a *renewingAgent) setOnboarding(o *device.OnboardingStatus, note string) {
	a.mu.Lock()
	a.onboarding = o
	a.mu.Unlock()
	a.NoteError(errors.New(note))
}

// set changes the renewal state, and publishes a status change as the engine's would.
func (a *renewingAgent) set(r *device.RenewalStatus, note string) {
	a.mu.Lock()
	a.renewal = r
	a.mu.Unlock()
	a.NoteError(errors.New(note))
}

// awaitRenewal waits until the renewal the twin holds under ReportedKey (decoded JSON, nil
// when absent) satisfies done, and returns it.
func (gb *gatewayBed) awaitRenewal(t *testing.T, done func(map[string]any) bool) map[string]any {
	t.Helper()
	return gb.awaitReported(t, "renewal", done)
}

// awaitReported waits until the object the twin holds as field under ReportedKey satisfies
// done, and returns it.
func (gb *gatewayBed) awaitReported(t *testing.T, field string, done func(map[string]any) bool) map[string]any {
	t.Helper()
	var got map[string]any
	require.NoError(t, gb.srv.Await(ctxFor(t), func() bool {
		tw, err := gb.srv.Twin("gw-0001")
		if err != nil {
			return false
		}
		u, _ := tw.Reported[gateway.ReportedKey].(map[string]any)
		got, _ = u[field].(map[string]any)
		return done(got)
	}))
	return got
}

// TestGatewayReportsOnboarding: a pending roll of the onboarding certificate is in the twin as
// it starts and ends, while connected.
func TestGatewayReportsOnboarding(t *testing.T) {
	var ra *renewingAgent
	gb := startGatewayBedAs(t, nil, func(a *device.Agent) gateway.Agent {
		ra = &renewingAgent{Agent: a}
		return ra
	})
	gb.WaitPhase(device.PhaseConnected)
	ra.setOnboarding(&device.OnboardingStatus{Roll: &device.RollStatus{From: "OLD", To: "NEW", Reason: "DPS refused"}}, "roll refused")
	o := gb.awaitReported(t, "onboarding", func(o map[string]any) bool { return o != nil })
	roll, _ := o["roll"].(map[string]any)
	assert.Equal(t, "OLD", roll["from_sha256_thumbprint"])
	assert.Equal(t, "NEW", roll["to_sha256_thumbprint"])
	assert.Equal(t, "DPS refused", roll["reason"])

	ra.setOnboarding(nil, "rolled")
	gb.awaitReported(t, "onboarding", func(o map[string]any) bool { return o == nil })
}

// TestGatewayReportsRenewal: the twin carries the renewal state beside validFrom and
// validUntil, reported as it changes while connected; a later outcome leaves no stale field
// of the one before.
func TestGatewayReportsRenewal(t *testing.T) {
	next := time.Date(2026, 12, 24, 9, 30, 0, 0, time.UTC)
	var ra *renewingAgent
	gb := startGatewayBedAs(t, nil, func(a *device.Agent) gateway.Agent {
		ra = &renewingAgent{Agent: a, renewal: &device.RenewalStatus{State: device.RenewalScheduled, NextAt: next, Via: device.ViaHub}}
		return ra
	})
	gb.WaitPhase(device.PhaseConnected)
	renewal := gb.awaitRenewal(t, func(r map[string]any) bool { return r != nil })
	// The hub drops the nulls of a patch: they remove what was there.
	assert.Equal(t, map[string]any{"state": "scheduled", "next_at": "2026-12-24T09:30:00Z", "via": "hub", "failures": json.Number("0")}, renewal)

	failedAt := next.Add(time.Minute)
	ra.set(&device.RenewalStatus{State: device.RenewalRetrying, NextAt: next.Add(time.Hour), Via: device.ViaDPS, Failures: 1,
		Last: &storage.RenewalResult{At: failedAt, Result: storage.RenewalFailed, Via: device.ViaHub, Error: "the hub answered 400040"}}, "renewal failed")
	renewal = gb.awaitRenewal(t, func(r map[string]any) bool { return r["state"] == "retrying" })
	assert.Equal(t, map[string]any{"at": "2026-12-24T09:31:00Z", "result": "failed", "via": "hub", "error": "the hub answered 400040"}, renewal["last"])
	assert.Equal(t, "2026-12-24T10:30:00Z", renewal["next_at"])
	assert.Equal(t, json.Number("1"), renewal["failures"])

	ra.set(&device.RenewalStatus{State: device.RenewalVerifying, Via: device.ViaDPS,
		Last: &storage.RenewalResult{At: failedAt.Add(time.Hour), Result: storage.Renewed, Via: device.ViaDPS, Thumbprint: "75FDC23E"}}, "renewed")
	renewal = gb.awaitRenewal(t, func(r map[string]any) bool { return r["state"] == "verifying" })
	assert.Nil(t, renewal["next_at"], "no time while verifying")
	last, _ := renewal["last"].(map[string]any)
	assert.Equal(t, "renewed", last["result"])
	assert.Equal(t, "75FDC23E", last["sha256_thumbprint"])
	assert.NotContains(t, last, "error", "the failure's error is gone with it")

	ra.set(nil, "issuance turned off")
	gb.awaitRenewal(t, func(r map[string]any) bool { return r == nil })
	tw, err := gb.srv.Twin("gw-0001")
	require.NoError(t, err)
	assert.NotContains(t, tw.Reported[gateway.ReportedKey], "renewal", "null removes it")
	assert.Contains(t, tw.Reported[gateway.ReportedKey], "validUntil")
}

func TestGatewayTelemetry(t *testing.T) {
	gb := newGatewayBed(t)
	ctx := ctxFor(t)
	answer, err := gb.api.SendTelemetry(ctx, []byte("21.5 C"), map[string]string{"sensor": "t 1", "$.ct": "text/plain"}, 10*time.Second)
	require.NoError(t, err)
	assert.True(t, answer.Delivered)

	var res localapi.TelemetryAnswer
	status := gb.call(t, "POST", "/v1/telemetry", `{"payload":{"temp":22},"properties":{"$.ct":"application/json","$.ce":"utf-8"}}`, &res)
	assert.Equal(t, http.StatusOK, status)
	assert.True(t, res.Delivered)
	assert.NotEmpty(t, res.MessageID, "the agent gives a message without $.mid one")
	status = gb.call(t, "POST", "/v1/telemetry?wait=0", `{"payload_base64":"AAE="}`, &res)
	assert.Equal(t, http.StatusAccepted, status)
	assert.True(t, res.Queued)
	assert.False(t, res.Delivered)

	got, err := gb.srv.WaitTelemetry(ctx, "gw-0001", 3)
	require.NoError(t, err)
	assert.Equal(t, "21.5 C", string(got[0].Payload))
	assert.Equal(t, map[string]string{"sensor": "t 1"}, got[0].Properties)
	assert.Equal(t, "text/plain", got[0].System["$.ct"])
	assert.JSONEq(t, `{"temp":22}`, string(got[1].Payload))
	assert.Equal(t, "application/json", got[1].System["$.ct"])
	assert.NotEmpty(t, got[1].System["$.mid"])
	assert.Equal(t, []byte{0, 1}, got[2].Payload)
	assert.Equal(t, res.MessageID, got[2].System["$.mid"], "the answer names the message the hub gets")

	tests := []struct {
		name, path, body string
		status           int
		reason           string
	}{
		{"bad JSON", "/v1/telemetry", `{"payload":`, 400, "invalid JSON body"},
		{"unknown field", "/v1/telemetry", `{"paylod":1}`, 400, "unknown field"},
		{"trailing data", "/v1/telemetry", `{} {}`, 400, "trailing data"},
		{"both payloads", "/v1/telemetry", `{"payload":1,"payload_base64":"AA=="}`, 400, "not both"},
		{"too large", "/v1/telemetry", `{"payload_base64":"` + strings.Repeat("A", 600<<10) + `"}`, 413, "exceeds"},
		{"over the hub's limit", "/v1/telemetry", `{"payload_base64":"` + strings.Repeat("A", 344<<10) + `"}`, 413, "too large"},
		{"bad timeout", "/v1/telemetry?timeout=forever", `{}`, 400, "timeout"},
		{"empty property name", "/v1/telemetry", `{"payload":1,"properties":{"":"x"}}`, 400, "property"},
		{"patch not an object", "/v1/twin/reported", `[1]`, 400, "invalid JSON body"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var e struct{ Error string }
			method := "POST"
			if strings.HasPrefix(tt.path, "/v1/twin") {
				method = "PATCH"
			}
			assert.Equal(t, tt.status, gb.call(t, method, tt.path, tt.body, &e))
			assert.Contains(t, e.Error, tt.reason)
		})
	}
}

func TestGatewayTwin(t *testing.T) {
	gb := newGatewayBed(t)
	var v struct{ Version int64 }
	require.Equal(t, http.StatusOK, gb.call(t, "PATCH", "/v1/twin/reported", `{"app":{"mode":"eco"}}`, &v))
	assert.Positive(t, v.Version)

	var e struct{ Error string }
	assert.Equal(t, http.StatusBadRequest, gb.call(t, "PATCH", "/v1/twin/reported", `{"unicity":{}}`, &e))
	assert.Contains(t, e.Error, "agent's own")

	var twin struct {
		Desired, Reported map[string]any
	}
	require.Equal(t, http.StatusOK, gb.call(t, "GET", "/v1/twin", "", &twin))
	assert.Equal(t, map[string]any{"mode": "eco"}, twin.Reported["app"])
	assert.Contains(t, twin.Desired, "$version")
}

// TestGatewayEvents is an application on the local API: it subscribes, receives a
// cloud-to-device message and a desired-property patch, and serves a direct method the
// emulated cloud invokes.
func TestGatewayEvents(t *testing.T) {
	gb := newGatewayBed(t)
	ctx := ctxFor(t)

	// A message sent before any application listens is kept for the first one.
	_, err := gb.srv.SendC2D("gw-0001", []byte(`{"early":true}`), nil)
	require.NoError(t, err)
	require.NoError(t, gb.srv.Await(ctx, func() bool {
		p, _ := gb.srv.PendingC2D("gw-0001")
		return len(p) == 0
	}))

	events := gb.subscribe(t, ctx, "c2d=1&desired=1&method=reboot,ping")
	first := events.next(t)
	assert.Equal(t, "subscribed", first.Type)
	assert.Equal(t, []string{"reboot", "ping"}, first.Methods)
	early := events.next(t)
	assert.Equal(t, "c2d", early.Type)
	assert.JSONEq(t, `{"early":true}`, string(early.Payload))

	_, err = gb.srv.SendC2D("gw-0001", []byte("hello\x00"), map[string]string{"prio": "high"})
	require.NoError(t, err)
	c2d := events.next(t)
	assert.Equal(t, "c2d", c2d.Type)
	assert.Equal(t, []byte("hello\x00"), c2d.PayloadBase64)
	assert.Empty(t, c2d.Payload, "not JSON")
	assert.Equal(t, "high", c2d.Properties["prio"])

	dv, err := gb.srv.PatchDesired("gw-0001", []byte(`{"interval":30}`))
	require.NoError(t, err)
	desired := events.next(t)
	assert.Equal(t, "desired", desired.Type)
	assert.Equal(t, int64(dv), desired.Version)
	assert.Contains(t, string(desired.Desired), `"interval":30`)

	type invoked struct {
		res hubtest.MethodResult
		err error
	}
	done := make(chan invoked, 1)
	go func() {
		res, err := gb.srv.Invoke(ctx, "gw-0001", "reboot", []byte(`{"delay":5}`))
		done <- invoked{res, err}
	}()
	call := events.next(t)
	assert.Equal(t, "method", call.Type)
	assert.Equal(t, "reboot", call.Name)
	assert.JSONEq(t, `{"delay":5}`, string(call.Payload))
	var ok map[string]bool
	require.Equal(t, http.StatusOK, gb.call(t, "POST", "/v1/methods/"+call.ID+"/response", `{"status":200,"payload":{"rebooting":"in 5s"}}`, &ok))
	got := <-done
	require.NoError(t, got.err)
	assert.Equal(t, 200, got.res.Status)
	assert.JSONEq(t, `{"rebooting":"in 5s"}`, string(got.res.Payload))

	var e struct{ Error string }
	assert.Equal(t, http.StatusNotFound, gb.call(t, "POST", "/v1/methods/"+call.ID+"/response", `{"status":200}`, &e), "answered already")
	assert.Equal(t, http.StatusBadRequest, gb.call(t, "POST", "/v1/methods/x/response", `{"payload":1}`, &e))
	assert.Contains(t, e.Error, "status")

	res, err := gb.srv.Invoke(ctx, "gw-0001", "unserved", nil)
	require.NoError(t, err)
	assert.Equal(t, 404, res.Status)

	events.close()
	// The application went away: its methods are no longer served.
	require.Eventually(t, func() bool {
		res, err := gb.srv.Invoke(ctx, "gw-0001", "ping", nil)
		return err == nil && res.Status == 404
	}, 5*time.Second, 10*time.Millisecond)

	assert.Equal(t, http.StatusBadRequest, gb.call(t, "GET", "/v1/events?method=unicity.status", "", &e))
	assert.Equal(t, http.StatusBadRequest, gb.call(t, "GET", "/v1/events", "", &e))
}

func TestGatewayAgentMethods(t *testing.T) {
	gb := newGatewayBed(t)
	ctx := ctxFor(t)
	res, err := gb.srv.Invoke(ctx, "gw-0001", gateway.MethodStatus, nil)
	require.NoError(t, err)
	assert.Equal(t, 200, res.Status)
	var st struct {
		Status device.Status
		Health gateway.Health
	}
	require.NoError(t, json.Unmarshal(res.Payload, &st))
	assert.Equal(t, device.PhaseConnected, st.Status.Phase)
	assert.Equal(t, "gw-0001", st.Health.RegistrationID)

	res, err = gb.srv.Invoke(ctx, "gw-0001", gateway.MethodReprovision, []byte(`{"force":"yes"}`))
	require.NoError(t, err)
	assert.Equal(t, 400, res.Status)

	// Registered moments ago: rate limited unless forced.
	res, err = gb.srv.Invoke(ctx, "gw-0001", gateway.MethodReprovision, nil)
	require.NoError(t, err)
	assert.Equal(t, 429, res.Status)
	assert.Contains(t, string(res.Payload), "reprovision_interval")
	assert.Equal(t, 1, gb.DPS.Calls())

	// The outcome comes back before the agent disconnects to use the new assignment.
	res, err = gb.srv.Invoke(ctx, "gw-0001", gateway.MethodReprovision, []byte(`{"force":true}`))
	require.NoError(t, err)
	assert.Equal(t, 200, res.Status)
	var asg struct{ Assignment localapi.Assignment }
	require.NoError(t, json.Unmarshal(res.Payload, &asg), "%s", res.Payload)
	assert.Equal(t, gb.srv.Name(), asg.Assignment.AssignedHub)
	assert.Equal(t, 2, gb.DPS.Calls())
	require.NoError(t, gb.srv.Await(ctx, func() bool { return gb.srv.Stats().Connections >= 2 && gb.srv.Connected("gw-0001") }))
	gb.WaitPhase(device.PhaseConnected)
}

type eventStream struct {
	resp *http.Response
	sc   *bufio.Scanner
	ch   chan localapi.Event
}

func (gb *gatewayBed) subscribe(t *testing.T, ctx context.Context, query string) *eventStream {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://unicity/v1/events?"+query, nil)
	require.NoError(t, err)
	resp, err := gb.http.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	s := &eventStream{resp: resp, sc: bufio.NewScanner(resp.Body), ch: make(chan localapi.Event, 16)}
	go func() {
		defer close(s.ch)
		for s.sc.Scan() {
			var e localapi.Event
			if json.Unmarshal(s.sc.Bytes(), &e) == nil {
				s.ch <- e
			}
		}
	}()
	t.Cleanup(s.close)
	return s
}

// next returns the next event but the full desired section that follows every connection,
// which reaches a subscriber whenever the session's resync completes.
func (s *eventStream) next(t *testing.T) localapi.Event {
	t.Helper()
	for {
		select {
		case e, ok := <-s.ch:
			require.True(t, ok, "event stream ended")
			if e.Type == "desired" && e.Full {
				continue
			}
			return e
		case <-time.After(10 * time.Second):
			t.Fatal("no event")
			return localapi.Event{}
		}
	}
}

func (s *eventStream) close() {
	s.resp.Body.Close()
	for range s.ch {
	}
}

// TestGatewayTelemetryWhileOffline: with the hub unreachable, a message whose PUBACK does not
// come within the wait is 202 with its message ID, stored; a full queue (refuse-new) is 507
// with Retry-After and stores nothing; the status shows the queue. Once the hub is back,
// every stored message arrives, in order, with its message ID.
func TestGatewayTelemetryWhileOffline(t *testing.T) {
	gb := startGatewayBed(t, func(tb *devicetest.Testbed) { tb.Config.Telemetry.MaxBytes = spool.MinMaxBytes })
	gb.WaitPhase(device.PhaseConnected)
	ctx := ctxFor(t)
	gb.srv.FailConnects(1<<20, 3)
	require.NoError(t, gb.srv.Disconnect("gw-0001"))

	var res localapi.TelemetryAnswer
	assert.Equal(t, http.StatusAccepted, gb.call(t, "POST", "/v1/telemetry?timeout=50ms", `{"payload":0,"properties":{"$.mid":"m-0"}}`, &res))
	assert.Equal(t, localapi.TelemetryAnswer{Queued: true, MessageID: "m-0"}, res, "not confirmed, but stored: it will be sent")

	// A quarter of the queue per message at most: the fourth 15 KiB message does not fit.
	payload := `"` + strings.Repeat("x", 15<<10) + `"`
	var mids []string
	for i := 1; ; i++ {
		resp, res := gb.postTelemetry(t, "?wait=0", fmt.Sprintf(`{"payload":%s,"properties":{"$.mid":"m-%d"}}`, payload, i))
		if resp.StatusCode == http.StatusInsufficientStorage {
			assert.Equal(t, "30", resp.Header.Get("Retry-After"))
			assert.Contains(t, res.Error, "full")
			assert.Empty(t, res.MessageID, "nothing stored")
			break
		}
		require.Equal(t, http.StatusAccepted, resp.StatusCode, res.Error)
		mids = append(mids, res.MessageID)
		require.Less(t, i, 10, "the queue never filled")
	}
	_, err := gb.api.SendTelemetry(ctx, []byte(payload), nil, time.Second)
	require.ErrorIs(t, err, device.ErrTemporary, "unicity send exits 75")
	assert.Contains(t, err.Error(), "queue full")

	st, err := gb.api.Status(ctx)
	require.NoError(t, err)
	require.NotNil(t, st.Telemetry)
	assert.Equal(t, 1+len(mids), st.Telemetry.Messages)
	assert.Greater(t, st.Telemetry.Bytes, int64(45<<10))
	assert.Equal(t, int64(spool.MinMaxBytes), st.Telemetry.MaxBytes)
	assert.Equal(t, "refuse-new", st.Telemetry.WhenFull)
	assert.Empty(t, st.Telemetry.Problem)

	gb.srv.FailConnects(0, 0)
	got, err := gb.srv.WaitTelemetry(ctx, "gw-0001", 1+len(mids))
	require.NoError(t, err)
	var arrived []string
	for _, m := range got {
		arrived = append(arrived, m.System["$.mid"])
	}
	assert.Equal(t, append([]string{"m-0"}, mids...), arrived)
	require.Eventually(t, func() bool { return gb.gateway.TelemetryStatus().Messages == 0 }, 10*time.Second, 10*time.Millisecond,
		"acknowledged messages leave the queue")
}

// TestGatewayTelemetryBeforeTheClock: until the agent has found the clock valid, the store is
// not open: 503 with Retry-After, and the status says why.
func TestGatewayTelemetryBeforeTheClock(t *testing.T) {
	gb := startGatewayBed(t, func(tb *devicetest.Testbed) { tb.Clock.Set(time.Unix(0, 0)) })
	gb.WaitPhase(device.PhaseWaitingClock)
	resp, res := gb.postTelemetry(t, "", `{"payload":1}`)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "5", resp.Header.Get("Retry-After"))
	assert.Contains(t, res.Error, "valid clock")

	st, err := gb.api.Status(ctxFor(t))
	require.NoError(t, err)
	require.NotNil(t, st.Telemetry)
	assert.Contains(t, st.Telemetry.Problem, "valid clock")
	_, err = os.Stat(gb.Config.Telemetry.Dir)
	assert.ErrorIs(t, err, fs.ErrNotExist, "not opened before the clock is valid")
}
