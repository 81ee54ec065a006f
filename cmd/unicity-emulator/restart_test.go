package main

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

func initDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "emu")
	_, code := runCLI(t, "init", "--dir", dir)
	require.Equal(t, 0, code)
	return dir
}

// sessionClient connects d to its hub with CleanSession 0, as the SDKs do, so that the hub
// keeps its session.
func sessionClient(t *testing.T, s serveLine, hub string, d device, msgs chan mqtt.Message) (mqtt.Client, bool) {
	t.Helper()
	tc := &tls.Config{RootCAs: trustPool(t, s.TrustBundle), ServerName: "localhost", MinVersion: tls.VersionTLS12,
		Certificates: []tls.Certificate{d.cert}}
	o := mqtt.NewClientOptions().AddBroker("tls://" + hubAddr(hub)).SetClientID(d.id).
		SetUsername(hub + "/" + d.id + "/?api-version=2021-04-12").SetTLSConfig(tc).SetProtocolVersion(4).
		SetAutoReconnect(false).SetCleanSession(false).SetOrderMatters(false).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { msgs <- m })
	c := mqtt.NewClient(o)
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(15*time.Second))
	require.NoError(t, tok.Error())
	t.Cleanup(func() { c.Disconnect(0) })
	return c, tok.(*mqtt.ConnectToken).SessionPresent()
}

// TestRestartKeepsState: after serve stops and starts again on the same directory, a
// device connects to the hub it was assigned without registering again, its session,
// pending C2D message and twin versions are there, and so are its telemetry and its
// registration record and history.
func TestRestartKeepsState(t *testing.T) {
	dir := initDir(t)
	s, stop := startServe(t, dir, "--hubs", "2")
	dev := newDevice(t, dir, "gw-keep")
	hub := register(t, s, dev)

	msgs := make(chan mqtt.Message, 10)
	c, _ := sessionClient(t, s, hub, dev, msgs)
	for _, f := range []string{"devices/gw-keep/messages/devicebound/#", "$iothub/twin/res/#"} {
		require.True(t, c.Subscribe(f, 1, nil).WaitTimeout(10*time.Second))
	}
	require.True(t, c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=1", 1, false, `{"fw":"1.2"}`).WaitTimeout(10*time.Second))
	assert.Equal(t, "$iothub/twin/res/204/?$rid=1&$version=2", next(t, msgs).Topic())
	require.True(t, c.Publish("devices/gw-keep/messages/events/kind=boot", 1, false, "before").WaitTimeout(10*time.Second))
	c.Disconnect(100)
	var sent map[string]string
	cliJSON(t, &sent, "c2d", "--dir", dir, "--device", "gw-keep", "--payload", "while down")
	var twin map[string]map[string]any
	cliJSON(t, &twin, "twin", "--dir", dir, "--device", "gw-keep", "--desired", `{"interval":30}`)
	stop()

	again := serve(t, dir, "--hubs", "2")
	assert.Equal(t, s.Hubs, again.Hubs, "the same hub names")
	assert.Equal(t, s.DPS, again.DPS, "DPS where devices were configured to find it")
	var devices []deviceJSON
	cliJSON(t, &devices, "devices", "--dir", dir)
	require.Len(t, devices, 1)
	assert.Equal(t, hub, devices[0].Hub)
	assert.Equal(t, 1, devices[0].PendingC2D)

	c, present := sessionClient(t, again, hub, dev, msgs)
	assert.True(t, present, "the session survived")
	m := next(t, msgs)
	assert.Equal(t, "while down", string(m.Payload()), "delivered on the kept subscription")
	assert.Contains(t, m.Topic(), "%24.mid="+sent["message_id"])
	require.True(t, c.Publish("$iothub/twin/GET/?$rid=2", 0, false, "").WaitTimeout(10*time.Second))
	m = next(t, msgs)
	require.Equal(t, "$iothub/twin/res/200/?$rid=2", m.Topic())
	var got struct {
		Desired  map[string]any `json:"desired"`
		Reported map[string]any `json:"reported"`
	}
	require.NoError(t, json.Unmarshal(m.Payload(), &got))
	assert.Equal(t, float64(2), got.Reported["$version"])
	assert.Equal(t, "1.2", got.Reported["fw"])
	assert.Equal(t, float64(2), got.Desired["$version"])
	assert.Equal(t, float64(30), got.Desired["interval"])

	var tel []telemetryJSON
	cliJSON(t, &tel, "telemetry", "--dir", dir, "--device", "gw-keep")
	require.Len(t, tel, 1)
	assert.Equal(t, "before", tel[0].Payload)
	var regs registrationsJSON
	cliJSON(t, &regs, "registrations", "--dir", dir, "--device", "gw-keep")
	require.Equal(t, 1, regs.Count, "the restart made no registration")
	assert.Equal(t, dpstest.OutcomeAssigned, regs.Registrations[0].Outcome)
	assert.Equal(t, hub, regs.Registrations[0].Hub)

	// DPS remembers the device: registering again keeps it where it is.
	assert.Equal(t, hub, register(t, again, dev))
	cliJSON(t, &regs, "registrations", "--dir", dir, "--device", "gw-keep")
	assert.Equal(t, 2, regs.Count)
	assert.Equal(t, dpstest.InitialAssignment, regs.Registrations[1].Substatus)
}

// freeLoopback is a loopback address no other test uses, with nothing on 8883 and 443.
func freeLoopback(t *testing.T) string {
	t.Helper()
	for range 20 {
		x, _ := rand.Int(rand.Reader, big.NewInt(250))
		ip := fmt.Sprintf("127.%d.%d.9", x.Int64()+2, time.Now().UnixNano()%250)
		l, err := net.Listen("tcp", ip+":8883")
		if err != nil {
			continue
		}
		l.Close()
		return ip
	}
	t.Skip("no free loopback address (not Linux?)")
	return ""
}

// TestServeLayout: a hub named by its own address has no port in its name and WebSocket on
// 443; without 443 its WebSocket moves to a free port, said on stderr; a restart serves the
// hubs where they were, or refuses when it cannot; --hub-host names hubs host:port.
func TestServeLayout(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		dir := initDir(t)
		s, stop := startServe(t, dir, "--hubs", "2")
		require.Len(t, s.Hubs, 2)
		a := net.ParseIP(s.Hubs[0])
		require.NotNil(t, a, "named by its address: %s", s.Hubs[0])
		assert.True(t, a.IsLoopback())
		assert.Equal(t, byte(2), a.To4()[3])
		assert.Equal(t, byte(3), net.ParseIP(s.Hubs[1]).To4()[3], "the next hub, the next address")
		conn, err := tls.Dial("tcp", s.Hubs[0]+":8883", &tls.Config{RootCAs: trustPool(t, s.TrustBundle), ServerName: s.Hubs[0]})
		require.NoError(t, err, "the certificate covers the hub's name")
		conn.Close()
		stop()
		again := serve(t, dir, "--hubs", "2")
		assert.Equal(t, s.Hubs, again.Hubs)
		assert.Equal(t, s.HubsWS, again.HubsWS)
	})

	t.Run("no port 443", func(t *testing.T) {
		ip := freeLoopback(t)
		busy, err := net.Listen("tcp", ip+":443")
		require.NoError(t, err)
		defer busy.Close()
		var stderr syncBuffer
		s, stop := startServeTo(t, initDir(t), &stderr, "--hub-addr", ip)
		defer stop()
		assert.Equal(t, ip, s.Hub, "a host alone listens on 8883 and names the hub")
		assert.NotEqual(t, ip+":443", s.HubsWS[0])
		assert.True(t, strings.HasPrefix(s.HubsWS[0], ip+":"), s.HubsWS[0])
		assert.Contains(t, stderr.String(), "port 443 takes root or CAP_NET_BIND_SERVICE")
	})

	t.Run("restart where it cannot listen", func(t *testing.T) {
		ip := freeLoopback(t)
		dir := initDir(t)
		_, stop := startServe(t, dir, "--hub-addr", ip)
		stop()
		squatter, err := net.Listen("tcp", ip+":8883")
		require.NoError(t, err)
		defer squatter.Close()
		var stderr bytes.Buffer
		err = run(testContext(t), []string{"serve", "--dir", dir}, io.Discard, &stderr)
		assert.ErrorContains(t, err, "cannot serve hub "+ip+" on "+ip+":8883 again")
	})

	t.Run("hub host", func(t *testing.T) {
		s := serve(t, initDir(t), "--hub-host", "emulator.test")
		assert.Regexp(t, `^emulator\.test:\d+$`, s.Hub)
	})
}

// syncBuffer is a bytes.Buffer for a writer on another goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// firstResponse sends a register request and returns the topic DPS answers on.
func firstResponse(t *testing.T, s serveLine, d device) string {
	t.Helper()
	msgs := make(chan mqtt.Message, 10)
	c, err := mqttClient(t, "tls://"+s.DPS, d.id, s.IDScope+"/registrations/"+d.id+"/api-version=2019-03-31",
		"localhost", trustPool(t, s.TrustBundle), d.cert, msgs, nil)
	require.NoError(t, err)
	require.True(t, c.Subscribe("$dps/registrations/res/#", 1, nil).WaitTimeout(10*time.Second))
	c.Publish("$dps/registrations/PUT/iotdps-register/?$rid=1", 1, false, `{"registrationId":"`+d.id+`"}`)
	return next(t, msgs).Topic()
}

// TestServeRetryAfter: DPS announces Azure's 3 s by default, and never less than the poll
// limit lets a client obey.
func TestServeRetryAfter(t *testing.T) {
	dir := initDir(t)
	s, stop := startServe(t, dir)
	assert.Equal(t, "$dps/registrations/res/202/?$rid=1&retry-after=3", firstResponse(t, s, newDevice(t, dir, "ra-1")))
	stop()

	var stderr syncBuffer
	s, stop = startServeTo(t, dir, &stderr, "--retry-after", "1")
	defer stop()
	assert.Equal(t, "$dps/registrations/res/202/?$rid=1&retry-after=2", firstResponse(t, s, newDevice(t, dir, "ra-2")))
	assert.Contains(t, stderr.String(), "--retry-after 1 raised to 2")
}

// TestStatistics: the counters and device gauges, as JSON on the admin socket and in
// Prometheus' format on --metrics-addr.
func TestStatistics(t *testing.T) {
	dir := initDir(t)
	s := serve(t, dir, "--metrics-addr", "127.0.0.1:0")
	require.NotEmpty(t, s.Metrics)
	dev := newDevice(t, dir, "gw-stats")
	hub := register(t, s, dev)
	_, err := connectHub(t, s, hub, dev, make(chan mqtt.Message, 1), nil)
	require.NoError(t, err)

	var stats statsJSON
	require.NoError(t, newAdminClient(dir).call(testContext(t), http.MethodGet, "/v1/stats", nil, nil, &stats))
	assert.Equal(t, int64(1), stats.DPS.Registrations)
	assert.Equal(t, int64(1), stats.DPS.Assignments)
	require.Len(t, stats.Hubs, 1)
	assert.Equal(t, hubStatsJSON{Hub: hub, Devices: 1, Connected: 1, Connections: 1}, stats.Hubs[0])

	req, err := http.NewRequestWithContext(testContext(t), http.MethodGet, s.Metrics, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, resp.Header.Get("Content-Type"), "text/plain; version=0.0.4")
	text := string(body)
	assert.Contains(t, text, "# TYPE unicity_emulator_dps_registrations_total counter\nunicity_emulator_dps_registrations_total 1\n")
	assert.Contains(t, text, `unicity_emulator_hub_connected_devices{hub="`+hub+`"} 1`)
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		assert.Regexp(t, `^(# (HELP|TYPE) unicity_emulator_\w+ .+|unicity_emulator_\w+(\{hub="[^"]+"\})? \d+)$`, line)
	}
}
