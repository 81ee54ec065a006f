package hub_test

import (
	"crypto/rand"
	"encoding/base64"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/attest"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/dial"
)

// The ESDK-C vector (protocol.md §5.9) pins the token's layout; its signature is a mock, so
// the signature here is openssl's for the key "Jefe":
// printf 'myiothub.azure-devices.net%%2Fdevices%%2Fmy_device\n1578941692' | openssl dgst -sha256 -hmac Jefe -binary | base64
func TestPasswordVector(t *testing.T) {
	got, err := hub.Password(testContext(t), "myiothub.azure-devices.net", "my_device", attest.SymmetricKey("Jefe"), time.Unix(1578941692, 0))
	require.NoError(t, err)
	const sig = "DhnKxlJ5WRGW1pTiHaGnPgWSd/TgqBXjtGEnJmbvtg0="
	assert.Equal(t, "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig="+url.QueryEscape(sig)+"&se=1578941692", got)
}

func newKey(t *testing.T) []byte {
	key := make([]byte, 32)
	_, err := rand.Read(key)
	require.NoError(t, err)
	return key
}

// sasConfig is a client configuration for a symmetric-key device of srv: no client
// certificate at all.
func sasConfig(srv *hubtest.Server, id string, key []byte) hub.Config {
	return hub.Config{
		Hub:          srv.Name(),
		DeviceID:     id,
		Dial:         dial.Config{Transport: dial.TransportMQTT, RootCAs: srv.RootCAs()},
		Signer:       attest.SymmetricKey(key),
		Backoff:      fastBackoff,
		WriteTimeout: time.Second,
	}
}

func TestSymmetricKey(t *testing.T) {
	srv := hubtest.NewServer(t)
	primary, secondary := newKey(t), newKey(t)
	require.NoError(t, srv.Register(hubtest.Device{ID: "sas-1", SymmetricKeys: [][]byte{primary, secondary}}))

	for name, key := range map[string][]byte{"primary": primary, "secondary": secondary} {
		t.Run(name, func(t *testing.T) {
			c := start(t, sasConfig(srv, "sas-1", key))
			require.NoError(t, c.Send(testContext(t), hub.Message{Payload: []byte(name)}))
			got := srv.Telemetry("sas-1")
			assert.Equal(t, name, string(got[len(got)-1].Payload))
			info, err := srv.Device("sas-1")
			require.NoError(t, err)
			assert.True(t, info.Connected)
			c.stop(t)
		})
	}
}

func TestSymmetricKeyOverWebSocket(t *testing.T) {
	srv := hubtest.NewServer(t)
	key := newKey(t)
	require.NoError(t, srv.Register(hubtest.Device{ID: "sas-ws", SymmetricKeys: [][]byte{key}}))
	cfg := sasConfig(srv, "sas-ws", key)
	_, port, _ := net.SplitHostPort(srv.WebSocketAddr)
	cfg.Hub = "localhost:" + port
	cfg.Dial.Transport = dial.TransportWebSocket
	c := start(t, cfg)
	require.NoError(t, c.Send(testContext(t), hub.Message{Payload: []byte("over 443")}))
	assert.Equal(t, "over 443", string(srv.Telemetry("sas-ws")[0].Payload))
	assert.Equal(t, dial.TransportWebSocket, c.State().Transport)
}

func TestSymmetricKeyRefused(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, srv *hubtest.Server) hub.Config
	}{
		{"wrong key", func(t *testing.T, srv *hubtest.Server) hub.Config {
			require.NoError(t, srv.Register(hubtest.Device{ID: "sas-r", SymmetricKeys: [][]byte{newKey(t)}}))
			return sasConfig(srv, "sas-r", newKey(t))
		}},
		{"X.509 device", func(t *testing.T, srv *hubtest.Server) hub.Config {
			newDeviceCA(t).register(t, srv.Hub, "sas-r")
			return sasConfig(srv, "sas-r", newKey(t))
		}},
		{"token expired on arrival", func(t *testing.T, srv *hubtest.Server) hub.Config {
			key := newKey(t)
			require.NoError(t, srv.Register(hubtest.Device{ID: "sas-r", SymmetricKeys: [][]byte{key}}))
			cfg := sasConfig(srv, "sas-r", key)
			cfg.Clock = &manualClock{now: time.Now().Add(-2 * time.Hour)}
			return cfg
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := hubtest.NewServer(t)
			c, err := hub.New(tt.setup(t, srv))
			require.NoError(t, err)
			err = c.Run(testContext(t))
			require.ErrorIs(t, err, hub.ErrNotAuthorized)
			assert.Equal(t, 1, srv.Stats().Refused, "an identity refusal is not retried")
			refusals := srv.Refusals()
			require.Len(t, refusals, 1)
			assert.Contains(t, refusals[0].Reason, "sas-r")
		})
	}
}

func TestCertificateAndKeyAreExclusive(t *testing.T) {
	srv := hubtest.NewServer(t)
	cfg := config(srv, "gw-both", newDeviceCA(t).softwareDevice(t, srv.Hub, "gw-both"))
	cfg.Signer = attest.SymmetricKey(newKey(t))
	_, err := hub.New(cfg)
	require.Error(t, err)
}

// manualClock is a clock whose time and timers the test moves.
type manualClock struct {
	mu      sync.Mutex
	now     time.Time
	waiting []manualTimer
	armed   chan time.Duration // receives each timer's duration, if set
}

type manualTimer struct {
	at time.Time
	ch chan time.Time
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *manualClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	c.waiting = append(c.waiting, manualTimer{at: c.now.Add(d), ch: ch})
	if c.armed != nil {
		c.armed <- d
	}
	return ch
}

func (c *manualClock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
	c.waiting = slices.DeleteFunc(c.waiting, func(w manualTimer) bool {
		if w.at.After(t) {
			return false
		}
		w.ch <- t
		return true
	})
}

// The hub disconnects a device whose token expired, so the client reconnects with a fresh
// token before that. The emulator's clock is moved past the first token's expiry before the
// renewal is due: the second CONNECT succeeds only with a newly signed token.
func TestSymmetricKeyTokenRenewal(t *testing.T) {
	start0 := time.Now().Truncate(time.Second)
	clock := &manualClock{now: start0, armed: make(chan time.Duration, 4)}
	srv := hubtest.NewServer(t, hubtest.WithClock(clock.Now))
	key := newKey(t)
	require.NoError(t, srv.Register(hubtest.Device{ID: "sas-renew", SymmetricKeys: [][]byte{key}}))

	cfg := sasConfig(srv, "sas-renew", key)
	cfg.TokenLifetime = 10 * time.Minute
	cfg.Clock = clock
	var mu sync.Mutex
	var states []hub.State
	cfg.OnState = func(s hub.State) { mu.Lock(); states = append(states, s); mu.Unlock() }
	c := start(t, cfg)
	c.connected(t)

	select {
	case d := <-clock.armed:
		assert.Equal(t, 8*time.Minute, d, "renewal after four fifths of the token's lifetime")
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal timer")
	}
	require.NoError(t, c.Send(testContext(t), hub.Message{Payload: []byte("before")}))

	// The first token is now expired for the hub; the renewal is due.
	clock.set(start0.Add(11 * time.Minute))
	ctx := testContext(t)
	require.NoError(t, srv.Await(ctx, func() bool { return srv.Stats().Connections == 2 && srv.Connected("sas-renew") }))
	select {
	case d := <-clock.armed:
		assert.Equal(t, 8*time.Minute, d, "the new token's renewal, timed from the new token")
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal timer for the second connection")
	}
	require.NoError(t, c.Send(ctx, hub.Message{Payload: []byte("after")}))

	assert.Equal(t, 0, srv.Stats().Refused)
	var payloads []string
	for _, m := range srv.Telemetry("sas-renew") {
		payloads = append(payloads, string(m.Payload))
	}
	assert.Equal(t, []string{"before", "after"}, payloads)
	mu.Lock()
	defer mu.Unlock()
	for _, s := range states {
		assert.Zero(t, s.Failures, "a renewal is not a failure")
		assert.Zero(t, s.Retry, "a renewal reconnects at once")
	}
}

// A refused CONNECT carries the token in its password; nothing the client reports may.
func TestSymmetricKeyNotInErrors(t *testing.T) {
	srv := hubtest.NewServer(t)
	require.NoError(t, srv.Register(hubtest.Device{ID: "sas-quiet", SymmetricKeys: [][]byte{newKey(t)}}))
	key := newKey(t)
	c, err := hub.New(sasConfig(srv, "sas-quiet", key))
	require.NoError(t, err)
	err = c.Run(testContext(t))
	require.ErrorIs(t, err, hub.ErrNotAuthorized)
	for _, text := range []string{err.Error(), c.State().Err.Error()} {
		assert.NotContains(t, text, base64.StdEncoding.EncodeToString(key))
		assert.NotContains(t, strings.ToLower(text), "sharedaccesssignature")
		assert.NotContains(t, text, "sig=")
	}
}
