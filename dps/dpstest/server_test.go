package dpstest_test

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/pki"
)

// TestNewStartClose is how unicity-emulator runs the server: its own CAs and scope.
func TestNewStartClose(t *testing.T) {
	root, err := pki.NewRoot("operator root")
	require.NoError(t, err)
	factory, err := root.NewIntermediate("operator factory")
	require.NoError(t, err)
	cfg := dpstest.DefaultConfig()
	cfg.IDScope = "0ne00C0FFEE"
	cfg.ServerCA = root
	cfg.FactoryCA = factory
	cfg.ServerNames = []string{"dps.example.test"}
	cfg.WebSocketAddr = "-"
	cfg.RetryAfter = 0
	s, err := dpstest.New(cfg)
	require.NoError(t, err)
	require.NoError(t, s.Start())
	t.Cleanup(func() { s.Close() })

	assert.Equal(t, "0ne00C0FFEE", s.IDScope())
	assert.Empty(t, s.WebSocketAddr())
	assert.Same(t, factory, s.FactoryCA())
	bundle, err := certcodec.ParseCertificates(s.TrustBundle())
	require.NoError(t, err)
	require.Len(t, bundle, 1)
	assert.True(t, bundle[0].Equal(root.Certificate))
	assert.True(t, s.IssuingCA().Root().Equal(root.Certificate), "issued certificates chain to the same root")

	for _, name := range []string{"dps.example.test", "localhost", dpstest.GlobalHost, "127.0.0.1"} {
		conn, err := tls.Dial("tcp", s.Addr(), &tls.Config{RootCAs: s.RootCAs(), ServerName: name, MinVersion: tls.VersionTLS12})
		require.NoError(t, err, name)
		assert.Equal(t, uint16(tls.VersionTLS12), conn.ConnectionState().Version, "DPS speaks TLS 1.2")
		conn.Close()
	}
	_, err = tls.Dial("tcp", s.Addr(), &tls.Config{RootCAs: s.RootCAs(), MaxVersion: tls.VersionTLS11, MinVersion: tls.VersionTLS10, ServerName: "localhost"})
	assert.Error(t, err, "TLS 1.2 is the floor")
	_, err = tls.Dial("tcp", s.Addr(), &tls.Config{RootCAs: s.RootCAs(), ServerName: "localhost", MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA}, MaxVersion: tls.VersionTLS12})
	assert.Error(t, err, "legacy suites are not offered")

	d := mustDial(t, s, dialOpts{regID: "op-dev", cert: factoryCert(t, s, "op-dev")})
	assert.Equal(t, "assigned", d.provision("op-dev").body.Status)
	d.client.Disconnect(0)

	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "Close is idempotent")
	_, err = net.DialTimeout("tcp", s.Addr(), time.Second)
	assert.Error(t, err, "nothing listens after Close")
}

func TestTLS13Option(t *testing.T) {
	s := dpstest.NewServer(t, func(c *dpstest.Config) { c.MaxTLSVersion = 0 })
	conn, err := tls.Dial("tcp", s.Addr(), &tls.Config{RootCAs: s.RootCAs(), ServerName: "localhost", MinVersion: tls.VersionTLS12})
	require.NoError(t, err)
	assert.Equal(t, uint16(tls.VersionTLS13), conn.ConnectionState().Version)
	conn.Close()
}

func TestStartFails(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	for _, tc := range []struct{ name, addr, ws string }{
		{"mqtt address taken", busy.Addr().String(), ""},
		{"websocket address taken", "", busy.Addr().String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := dpstest.DefaultConfig()
			cfg.Addr, cfg.WebSocketAddr = tc.addr, tc.ws
			s, err := dpstest.New(cfg)
			require.NoError(t, err)
			assert.Error(t, s.Start())
			assert.NoError(t, s.Close())
		})
	}
}

func TestWebSocketPaths(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	cert := factoryCert(t, s, "ws-dev")
	for _, tc := range []struct {
		path string
		ok   bool
	}{{"/", true}, {"/$iothub/websocket", true}, {"/mqtt", false}} {
		t.Run(tc.path, func(t *testing.T) {
			opts := mqtt.NewClientOptions().AddBroker("wss://" + s.WebSocketAddr() + tc.path).
				SetClientID("ws-dev").SetUsername(s.IDScope() + "/registrations/ws-dev/api-version=2019-03-31").
				SetAutoReconnect(false).SetConnectTimeout(waitTimeout).
				SetTLSConfig(&tls.Config{RootCAs: s.RootCAs(), ServerName: "localhost", Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12})
			c := mqtt.NewClient(opts)
			tok := c.Connect()
			require.True(t, tok.WaitTimeout(waitTimeout))
			if !tc.ok {
				assert.Error(t, tok.Error())
				return
			}
			require.NoError(t, tok.Error())
			c.Disconnect(0)
		})
	}
}

func TestStats(t *testing.T) {
	s := dpstest.NewServer(t, fast)
	assert.Equal(t, dpstest.Stats{}, s.Stats(), "no DPS traffic")
	d := mustDial(t, s, dialOpts{regID: "counted", cert: factoryCert(t, s, "counted")})
	d.provision("counted")
	d.provision("counted")
	assert.Equal(t, dpstest.Stats{Connections: 1, Registrations: 2, Polls: 2, Assignments: 2}, s.Stats())
}
