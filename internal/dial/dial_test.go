package dial_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/internal/certcodec"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/dial/dialtest"
	"github.com/unicity-iot/unicity/internal/pki"
)

const azureHost = "global.azure-devices-provisioning.net"

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestAzureRoots(t *testing.T) {
	tests := []struct {
		file, cn, sha256 string
	}{
		{"digicert-global-root-g2.pem", "DigiCert Global Root G2", "cb3ccbb76031e5e0138f8dd39a23f9de47ffc35e43c1144cea27d46a5ab1cb5f"},
		{"digicert-global-root-g3.pem", "DigiCert Global Root G3", "31ad6648f8104138c738f39ea4320133393e3a18cc02296ef97c2ac9ef6731d0"},
		{"microsoft-rsa-root-ca-2017.pem", "Microsoft RSA Root Certificate Authority 2017", "c741f70f4b2a8d88bf2e71c14122ef53ef10eba0cfa5e64cfa20f418853073e0"},
		{"microsoft-ecc-root-ca-2017.pem", "Microsoft ECC Root Certificate Authority 2017", "358df39d764af9e1b766e9c972df352ee15cfac227af6ad1d70e8e4a6edcba02"},
	}
	pool := dial.AzureRoots()
	for _, tt := range tests {
		t.Run(tt.cn, func(t *testing.T) {
			data, err := os.ReadFile("roots/" + tt.file)
			require.NoError(t, err)
			block, rest := pem.Decode(data)
			require.NotNil(t, block)
			assert.Empty(t, strings.TrimSpace(string(rest)), "one certificate per file")
			cert, err := x509.ParseCertificate(block.Bytes)
			require.NoError(t, err)
			assert.True(t, cert.IsCA && cert.BasicConstraintsValid, "is a CA")
			assert.Equal(t, tt.cn, cert.Subject.CommonName)
			sum := sha256.Sum256(cert.Raw)
			assert.Equal(t, tt.sha256, hex.EncodeToString(sum[:]))
			_, err = cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: cert.NotBefore.Add(time.Hour)})
			assert.NoError(t, err, "AzureRoots holds it")
		})
	}
	files, err := os.ReadDir("roots")
	require.NoError(t, err)
	assert.Len(t, files, len(tests), "no root built in without a test")
}

func TestRootPool(t *testing.T) {
	ca, err := pki.NewRoot("Test Root")
	require.NoError(t, err)
	pool, err := dial.RootPool(certcodec.EncodeCertificates(ca.Root()))
	require.NoError(t, err)
	srv, err := ca.IssueServer([]string{azureHost})
	require.NoError(t, err)
	_, err = srv.Certificate().Verify(x509.VerifyOptions{Roots: pool, DNSName: azureHost})
	assert.NoError(t, err, "extra bundle trusted")

	assert.False(t, dial.AzureRoots().Equal(pool))

	_, err = dial.RootPool([]byte("not a certificate"))
	assert.Error(t, err)
}

// servers is a TLS echo server and a WebSocket echo server sharing one test PKI.
type servers struct {
	roots      *x509.CertPool
	deviceCA   *pki.CA
	device     tls.Certificate
	tlsAddr    string
	wsAddr     string
	mu         sync.Mutex
	clientCNs  []string
	subprotos  []string
	wsPaths    []string
	tlsVersion []uint16
}

func startServers(t *testing.T) *servers {
	t.Helper()
	ca, err := pki.NewRoot("Test Server Root")
	require.NoError(t, err)
	leaf, err := ca.IssueServer([]string{azureHost, "localhost", "127.0.0.1"})
	require.NoError(t, err)
	devCA, err := pki.NewRoot("Test Device Root")
	require.NoError(t, err)
	dev, err := devCA.NewDevice("gw-01")
	require.NoError(t, err)
	s := &servers{roots: ca.Pool(), deviceCA: devCA, device: dev.TLSCertificate()}
	serverTLS := &tls.Config{
		Certificates: []tls.Certificate{leaf.TLSCertificate()},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    devCA.Pool(),
		VerifyConnection: func(cs tls.ConnectionState) error {
			s.mu.Lock()
			defer s.mu.Unlock()
			cn := ""
			if len(cs.PeerCertificates) > 0 {
				cn = cs.PeerCertificates[0].Subject.CommonName
			}
			s.clientCNs = append(s.clientCNs, cn)
			s.tlsVersion = append(s.tlsVersion, cs.Version)
			return nil
		},
	}

	ln, err := tls.Listen("tcp", "127.0.0.1:0", serverTLS)
	require.NoError(t, err)
	s.tlsAddr = ln.Addr().String()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()

	upgrader := websocket.Upgrader{Subprotocols: []string{"mqtt"}}
	ws := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.wsPaths = append(s.wsPaths, r.URL.Path)
		s.subprotos = append(s.subprotos, r.Header.Get("Sec-Websocket-Protocol"))
		s.mu.Unlock()
		c, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		for {
			mt, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	}))
	ws.TLS = serverTLS
	ws.StartTLS()
	s.wsAddr = ws.Listener.Addr().String()
	t.Cleanup(func() {
		ws.CloseClientConnections()
		ws.Close()
		ln.Close()
		wg.Wait()
	})
	return s
}

func echo(t *testing.T, c net.Conn) {
	t.Helper()
	_, err := c.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf))
}

func TestDial(t *testing.T) {
	s := startServers(t)
	authProxy := dialtest.NewProxy(t, dialtest.WithAuth("tech", "s3cr:t"),
		dialtest.WithRoute(azureHost+":8883", s.tlsAddr),
		dialtest.WithRoute(azureHost+":443", s.wsAddr))
	blocking := dialtest.NewProxy(t,
		dialtest.WithRoute(azureHost+":8883", ""),
		dialtest.WithRoute(azureHost+":443", s.wsAddr))
	// Port 443 reaches a TLS server that does no WebSocket, as behind a middlebox that does
	// not pass WebSocket upgrades.
	noWebSocket := dialtest.NewProxy(t,
		dialtest.WithRoute(azureHost+":8883", ""),
		dialtest.WithRoute(azureHost+":443", s.tlsAddr))

	tests := []struct {
		name          string
		cfg           dial.Config
		wantTransport string
		wantTunnels   []string
		proxy         *dialtest.Proxy
	}{
		{name: "mqtt", cfg: dial.Config{Host: s.tlsAddr, Transport: dial.TransportMQTT}, wantTransport: dial.TransportMQTT},
		{name: "websocket", cfg: dial.Config{Host: s.wsAddr, Transport: dial.TransportWebSocket}, wantTransport: dial.TransportWebSocket},
		{name: "auto takes 8883", cfg: dial.Config{Host: s.tlsAddr}, wantTransport: dial.TransportMQTT},
		{name: "mqtt via proxy with auth", cfg: dial.Config{Host: azureHost, Transport: dial.TransportMQTT, Proxy: authProxy.URL.String()},
			wantTransport: dial.TransportMQTT, proxy: authProxy, wantTunnels: []string{azureHost + ":8883"}},
		{name: "websocket via proxy with auth", cfg: dial.Config{Host: azureHost, Transport: dial.TransportWebSocket, Proxy: authProxy.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: authProxy, wantTunnels: []string{azureHost + ":443"}},
		{name: "auto falls back to 443 when 8883 is blocked", cfg: dial.Config{Host: azureHost, Transport: dial.TransportAuto, Proxy: blocking.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: blocking, wantTunnels: []string{azureHost + ":443"}},
		{name: "auto tries the preferred transport first", cfg: dial.Config{Host: azureHost, Prefer: dial.TransportWebSocket, Proxy: authProxy.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: authProxy, wantTunnels: []string{azureHost + ":443"}},
		{name: "https", cfg: dial.Config{Host: s.tlsAddr, Transport: dial.TransportHTTPS, HTTPS: true}, wantTransport: dial.TransportHTTPS},
		{name: "https via proxy on 443", cfg: dial.Config{Host: azureHost, Transport: dial.TransportHTTPS, HTTPS: true, Proxy: noWebSocket.URL.String()},
			wantTransport: dial.TransportHTTPS, proxy: noWebSocket, wantTunnels: []string{azureHost + ":443"}},
		{name: "auto falls back to https when the websocket handshake fails", cfg: dial.Config{Host: azureHost, HTTPS: true, Proxy: noWebSocket.URL.String()},
			wantTransport: dial.TransportHTTPS, proxy: noWebSocket, wantTunnels: []string{azureHost + ":443", azureHost + ":443"}},
		{name: "auto tries a preferred https first", cfg: dial.Config{Host: azureHost, HTTPS: true, Prefer: dial.TransportHTTPS, Proxy: noWebSocket.URL.String()},
			wantTransport: dial.TransportHTTPS, proxy: noWebSocket, wantTunnels: []string{azureHost + ":443"}},
		{name: "auto without https does not try it", cfg: dial.Config{Host: azureHost, Prefer: dial.TransportMQTT, Proxy: blocking.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: blocking, wantTunnels: []string{azureHost + ":443"}},
		{name: "an MQTT-only caller takes https for the websocket", cfg: dial.Config{Host: azureHost, Transport: dial.TransportHTTPS, Proxy: authProxy.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: authProxy, wantTunnels: []string{azureHost + ":443"}},
		{name: "an MQTT-only caller preferring https tries the websocket first", cfg: dial.Config{Host: azureHost, Prefer: dial.TransportHTTPS, Proxy: authProxy.URL.String()},
			wantTransport: dial.TransportWebSocket, proxy: authProxy, wantTunnels: []string{azureHost + ":443"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before []string
			if tt.proxy != nil {
				before = tt.proxy.Tunnels()
			}
			tt.cfg.RootCAs = s.roots
			tt.cfg.Certificate = &s.device
			conn, transport, err := dial.Dial(t.Context(), tt.cfg)
			require.NoError(t, err)
			defer conn.Close()
			assert.Equal(t, tt.wantTransport, transport)
			echo(t, conn)
			if tt.proxy != nil {
				assert.Equal(t, tt.wantTunnels, tt.proxy.Tunnels()[len(before):])
			}
			s.mu.Lock()
			assert.Equal(t, "gw-01", s.clientCNs[len(s.clientCNs)-1], "client certificate presented")
			s.mu.Unlock()
		})
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.wsPaths {
		assert.Equal(t, "/$iothub/websocket", s.wsPaths[i])
		assert.Equal(t, "mqtt", s.subprotos[i])
	}
	assert.NotEmpty(t, s.wsPaths)
}

func TestDialRSAPinnedToTLS12(t *testing.T) {
	s := startServers(t)
	dev, err := s.deviceCA.NewDevice("gw-rsa", pki.WithKeyType(pki.RSA2048))
	require.NoError(t, err)
	cert := dev.TLSCertificate()
	cert.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.PKCS1WithSHA256}
	conn, _, err := dial.Dial(t.Context(), dial.Config{Host: s.tlsAddr, Transport: dial.TransportMQTT, RootCAs: s.roots, Certificate: &cert})
	require.NoError(t, err)
	defer conn.Close()
	echo(t, conn)
	s.mu.Lock()
	defer s.mu.Unlock()
	assert.Equal(t, uint16(tls.VersionTLS12), s.tlsVersion[len(s.tlsVersion)-1])
}

func TestDialFailures(t *testing.T) {
	s := startServers(t)
	authProxy := dialtest.NewProxy(t, dialtest.WithAuth("tech", "right"))
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedAddr := closed.Addr().String()
	closed.Close()

	tests := []struct {
		name          string
		cfg           dial.Config
		wantErr       string
		isUnreachable bool
	}{
		{"untrusted server", dial.Config{Host: s.tlsAddr, Transport: dial.TransportMQTT}, "certificate signed by unknown authority", true},
		{"server name mismatch", dial.Config{Host: "127.0.0.2:" + port(s.tlsAddr), Transport: dial.TransportMQTT, RootCAs: s.roots}, "", true},
		{"refused", dial.Config{Host: closedAddr, Transport: dial.TransportMQTT, RootCAs: s.roots}, "connection refused", true},
		{"auto reports both attempts", dial.Config{Host: closedAddr, RootCAs: s.roots}, "(mqtt-ws)", true},
		{"auto with https reports all three attempts", dial.Config{Host: closedAddr, RootCAs: s.roots, HTTPS: true}, "(https)", true},
		{"wrong proxy credentials", dial.Config{Host: s.tlsAddr, Transport: dial.TransportMQTT, RootCAs: s.roots,
			Proxy: strings.Replace(authProxy.URL.String(), "right", "wrong", 1)}, "requires authentication", true},
		{"unknown transport", dial.Config{Host: s.tlsAddr, Transport: "amqp"}, `unknown transport "amqp"`, false},
		{"socks proxy", dial.Config{Host: s.tlsAddr, Proxy: "socks5://127.0.0.1:1080"}, "HTTP CONNECT proxy", false},
		{"bad port", dial.Config{Host: "example.com:99999"}, "invalid port", false},
		{"no host", dial.Config{}, "no endpoint host", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Timeout = 5 * time.Second
			_, _, err := dial.Dial(t.Context(), tt.cfg)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Equal(t, tt.isUnreachable, errors.Is(err, dial.ErrUnreachable), "errors.Is(err, ErrUnreachable)")
		})
	}
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

func TestProxyFromEnvironment(t *testing.T) {
	s := startServers(t)
	envProxy := dialtest.NewProxy(t, dialtest.WithAuth("u", "p"), dialtest.WithRoute(azureHost+":8883", s.tlsAddr))
	t.Setenv("HTTPS_PROXY", envProxy.URL.String())
	t.Setenv("https_proxy", envProxy.URL.String())

	t.Run("used", func(t *testing.T) {
		conn, _, err := dial.Dial(t.Context(), dial.Config{Host: azureHost, Transport: dial.TransportMQTT, RootCAs: s.roots})
		require.NoError(t, err)
		defer conn.Close()
		echo(t, conn)
		assert.Equal(t, []string{azureHost + ":8883"}, envProxy.Tunnels())
	})
	t.Run("NO_PROXY respected", func(t *testing.T) {
		t.Setenv("NO_PROXY", "azure-devices-provisioning.net.invalid")
		t.Setenv("no_proxy", "azure-devices-provisioning.net.invalid")
		// Direct to a name that does not resolve here: it fails, and not through the proxy.
		_, _, err := dial.Dial(t.Context(), dial.Config{Host: azureHost + ".invalid", Transport: dial.TransportMQTT, RootCAs: s.roots, Timeout: 5 * time.Second})
		require.Error(t, err)
		assert.NotContains(t, err.Error(), "via proxy")
		assert.Len(t, envProxy.Tunnels(), 1)
	})
}

// TestDialCancel checks that cancelling the context ends a stuck handshake at once (TLS,
// WebSocket, proxy CONNECT), without the error being taken for an unreachable endpoint.
func TestDialCancel(t *testing.T) {
	tests := []struct {
		name, transport string
		viaProxy        bool
	}{
		{"tls", dial.TransportMQTT, false},
		{"websocket", dial.TransportWebSocket, false},
		{"auto", dial.TransportAuto, false},
		{"proxy CONNECT", dial.TransportMQTT, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer goleak.VerifyNone(t)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			accepted := make(chan net.Conn, 2)
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						close(accepted)
						return
					}
					accepted <- c // never answered: the handshake hangs
				}
			}()
			defer func() {
				ln.Close()
				for c := range accepted {
					c.Close()
				}
			}()
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				c := <-accepted
				defer c.Close()
				cancel()
			}()
			cfg := dial.Config{Host: ln.Addr().String(), Transport: tt.transport, Timeout: time.Minute}
			if tt.viaProxy {
				cfg.Host, cfg.Proxy = azureHost, "http://"+ln.Addr().String()
			}
			start := time.Now()
			_, _, err = dial.Dial(ctx, cfg)
			require.ErrorIs(t, err, context.Canceled)
			assert.NotErrorIs(t, err, dial.ErrUnreachable)
			assert.Less(t, time.Since(start), 10*time.Second)
		})
	}
}

// TestDialBoundsIncomingPackets: what Dial returns refuses an incoming MQTT packet over
// MaxPacket, on both MQTT transports (the test servers echo what they receive), and leaves
// the bytes of an HTTPS connection alone.
func TestDialBoundsIncomingPackets(t *testing.T) {
	s := startServers(t)
	big := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	big.TopicName, big.Payload = "devices/gw-01/messages/devicebound/", bytes.Repeat([]byte("x"), 2000)
	for _, cfg := range []dial.Config{
		{Host: s.tlsAddr, Transport: dial.TransportMQTT},
		{Host: s.wsAddr, Transport: dial.TransportWebSocket},
	} {
		t.Run(cfg.Transport, func(t *testing.T) {
			cfg.RootCAs, cfg.Certificate, cfg.MaxPacket = s.roots, &s.device, 1000
			conn, _, err := dial.Dial(t.Context(), cfg)
			require.NoError(t, err)
			defer conn.Close()
			require.NoError(t, big.Write(conn))
			_, err = packets.ReadPacket(conn)
			assert.ErrorIs(t, err, dial.ErrPacketTooLarge)
		})
	}
	t.Run("https", func(t *testing.T) {
		conn, _, err := dial.Dial(t.Context(), dial.Config{Host: s.tlsAddr, Transport: dial.TransportHTTPS, HTTPS: true,
			RootCAs: s.roots, MaxPacket: 1000})
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, big.Write(conn))
		p, err := packets.ReadPacket(conn)
		require.NoError(t, err)
		assert.Len(t, p.(*packets.PublishPacket).Payload, 2000)
	})
}
