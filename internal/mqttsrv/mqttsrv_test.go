package mqttsrv_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
	"github.com/unicity-iot/unicity/internal/pki"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoHandler accepts devices whose username is not "refuse", grants QoS 1 and answers every
// publish on "req/<x>" with a QoS 1 publish on "res/<x>" to the same connection only.
type echoHandler struct {
	mu           sync.Mutex
	connected    []*mqttsrv.Conn
	disconnected chan error
	acks         chan struct{}
}

func newEchoHandler() *echoHandler {
	return &echoHandler{disconnected: make(chan error, 10), acks: make(chan struct{}, 10)}
}

func (h *echoHandler) Connect(c *mqttsrv.Conn) (byte, bool) {
	if c.Username == "refuse" {
		return packets.ErrRefusedNotAuthorised, false
	}
	h.mu.Lock()
	h.connected = append(h.connected, c)
	h.mu.Unlock()
	return packets.Accepted, false
}

func (h *echoHandler) Subscribe(_ *mqttsrv.Conn, filters []string, _ []byte) []byte {
	granted := make([]byte, len(filters))
	for i, f := range filters {
		if f == "forbidden" {
			granted[i] = 0x80
		} else {
			granted[i] = 1
		}
	}
	return granted
}

func (h *echoHandler) Publish(c *mqttsrv.Conn, m mqttsrv.Message) error {
	if m.QoS == 2 {
		return errors.New("QoS 2 is not supported")
	}
	acked, err := c.Publish(mqttsrv.Message{Topic: "res/" + m.Topic[len("req/"):], QoS: 1, Payload: m.Payload})
	if err != nil {
		return err
	}
	go func() {
		select {
		case <-acked:
			h.acks <- struct{}{}
		case <-c.Done():
		}
	}()
	return nil
}

func (h *echoHandler) Disconnected(_ *mqttsrv.Conn, err error) { h.disconnected <- err }

// Connected greets a "welcome" client, which must see the greeting after its CONNACK.
func (h *echoHandler) Connected(c *mqttsrv.Conn) {
	if c.Username == "welcome" {
		c.Publish(mqttsrv.Message{Topic: "greeting", Payload: []byte("hello")})
	}
}

type fixture struct {
	srv     *mqttsrv.Server
	addr    string
	handler *echoHandler
	ca      *pki.CA
	client  tls.Certificate
}

func newFixture(t *testing.T, opts ...func(*mqttsrv.Server)) *fixture {
	t.Helper()
	ca, err := pki.NewRoot("mqttsrv test CA")
	require.NoError(t, err)
	server, err := ca.IssueServer([]string{"localhost", "127.0.0.1"})
	require.NoError(t, err)
	device, err := ca.NewDevice("device-1")
	require.NoError(t, err)

	h := newEchoHandler()
	srv := &mqttsrv.Server{Handler: h, MaxPacketSize: 4096, TLSConfig: &tls.Config{
		Certificates: []tls.Certificate{server.TLSCertificate()},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
		MinVersion:   tls.VersionTLS12,
	}}
	for _, o := range opts {
		o(srv)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return &fixture{srv: srv, addr: l.Addr().String(), handler: h, ca: ca, client: device.TLSCertificate()}
}

func (f *fixture) clientTLS() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{f.client}, RootCAs: f.ca.Pool(), ServerName: "localhost"}
}

func (f *fixture) connect(t *testing.T, broker, username string) (mqtt.Client, error) {
	t.Helper()
	return f.connectWith(t, broker, username, mqtt.NewClientOptions())
}

func (f *fixture) connectWith(t *testing.T, broker, username string, opts *mqtt.ClientOptions) (mqtt.Client, error) {
	t.Helper()
	opts = opts.AddBroker(broker).SetClientID("device-1").SetUsername(username).
		SetTLSConfig(f.clientTLS()).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second).SetProtocolVersion(4)
	c := mqtt.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatal("connect timed out")
	}
	if tok.Error() == nil {
		t.Cleanup(func() { c.Disconnect(0) })
	}
	return c, tok.Error()
}

func requestReply(t *testing.T, c mqtt.Client) {
	t.Helper()
	got := make(chan mqtt.Message, 1)
	tok := c.Subscribe("res/#", 1, func(_ mqtt.Client, m mqtt.Message) { got <- m })
	require.True(t, tok.WaitTimeout(5*time.Second))
	require.NoError(t, tok.Error())
	require.Equal(t, []byte{1}, []byte{tok.(*mqtt.SubscribeToken).Result()["res/#"]})

	pub := c.Publish("req/42", 1, false, []byte("ping"))
	require.True(t, pub.WaitTimeout(5*time.Second))
	require.NoError(t, pub.Error())
	select {
	case m := <-got:
		assert.Equal(t, "res/42", m.Topic())
		assert.Equal(t, "ping", string(m.Payload()))
		assert.Equal(t, byte(1), m.Qos())
	case <-time.After(5 * time.Second):
		t.Fatal("no reply")
	}
}

func TestRequestReplyOverTLS(t *testing.T) {
	f := newFixture(t)
	c, err := f.connect(t, "ssl://"+f.addr, "hub/device-1/?api-version=2021-04-12")
	require.NoError(t, err)
	requestReply(t, c)

	select {
	case <-f.handler.acks:
	case <-time.After(5 * time.Second):
		t.Fatal("the client's PUBACK did not complete the server's QoS 1 publish")
	}
	f.handler.mu.Lock()
	conn := f.handler.connected[0]
	f.handler.mu.Unlock()
	assert.Equal(t, "device-1", conn.ClientID)
	assert.Equal(t, "hub/device-1/?api-version=2021-04-12", conn.Username)
	require.NotNil(t, conn.TLS)
	assert.Equal(t, "device-1", conn.TLS.PeerCertificates[0].Subject.CommonName)

	c.Disconnect(100)
	select {
	case err := <-f.handler.disconnected:
		assert.NoError(t, err, "a DISCONNECT packet is a clean end")
	case <-time.After(5 * time.Second):
		t.Fatal("Disconnected not called")
	}
}

func TestRequestReplyOverWebSocket(t *testing.T) {
	for _, path := range []string{"/", "/$iothub/websocket"} {
		t.Run(path, func(t *testing.T) {
			f := newFixture(t)
			hs := httptest.NewUnstartedServer(f.srv.WebSocket())
			hs.TLS = f.srv.TLSConfig
			hs.StartTLS()
			defer hs.Close()
			c, err := f.connect(t, "wss://"+hs.Listener.Addr().String()+path, "user")
			require.NoError(t, err)
			requestReply(t, c)
			f.handler.mu.Lock()
			defer f.handler.mu.Unlock()
			assert.True(t, f.handler.connected[0].WebSocket)
			assert.Equal(t, "device-1", f.handler.connected[0].TLS.PeerCertificates[0].Subject.CommonName)
		})
	}
}

func TestWebSocketOnTheMQTTPort(t *testing.T) {
	for _, path := range []string{"/", "/$iothub/websocket"} {
		t.Run(path, func(t *testing.T) {
			f := newFixture(t)
			c, err := f.connect(t, "wss://"+f.addr+path, "user")
			require.NoError(t, err)
			requestReply(t, c)
			f.handler.mu.Lock()
			defer f.handler.mu.Unlock()
			assert.True(t, f.handler.connected[0].WebSocket)
			assert.Equal(t, "device-1", f.handler.connected[0].TLS.PeerCertificates[0].Subject.CommonName)
		})
	}
}

// TestHTTPHandlerOnTheMQTTPort: with an HTTP handler, the MQTT port serves REST requests of
// any method, with the client's certificate, beside WebSocket upgrades and plain MQTT.
func TestHTTPHandlerOnTheMQTTPort(t *testing.T) {
	f := newFixture(t, func(s *mqttsrv.Server) {
		s.HTTP = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Upgrade") != "" {
				s.WebSocket().ServeHTTP(w, r)
				return
			}
			if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
				http.Error(w, "no client certificate", http.StatusUnauthorized)
				return
			}
			io.WriteString(w, r.Method+" "+r.URL.Path+" from "+r.TLS.PeerCertificates[0].Subject.CommonName)
		})
	})
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: f.clientTLS()}}
	defer client.CloseIdleConnections()
	for _, method := range []string{http.MethodPut, http.MethodGet, http.MethodPost, http.MethodDelete} {
		req, err := http.NewRequest(method, "https://"+f.addr+"/scope/registrations/device-1/register", strings.NewReader("{}"))
		require.NoError(t, err)
		resp, err := client.Do(req)
		require.NoError(t, err, method)
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, resp.StatusCode, method)
		assert.Equal(t, method+" /scope/registrations/device-1/register from device-1", string(body))
	}

	ws, err := f.connect(t, "wss://"+f.addr+"/$iothub/websocket", "user")
	require.NoError(t, err)
	requestReply(t, ws)
	c, err := f.connect(t, "ssl://"+f.addr, "user")
	require.NoError(t, err)
	requestReply(t, c)
}

func TestConnectedRunsAfterConnack(t *testing.T) {
	f := newFixture(t)
	got := make(chan mqtt.Message, 1)
	opts := mqtt.NewClientOptions().SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { got <- m })
	_, err := f.connectWith(t, "ssl://"+f.addr, "welcome", opts)
	require.NoError(t, err)
	select {
	case m := <-got:
		assert.Equal(t, "greeting", m.Topic())
	case <-time.After(5 * time.Second):
		t.Fatal("no message from Connected")
	}
}

func TestWebSocketRejectsOtherPaths(t *testing.T) {
	f := newFixture(t)
	hs := httptest.NewUnstartedServer(f.srv.WebSocket())
	hs.TLS = f.srv.TLSConfig
	hs.StartTLS()
	defer hs.Close()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: f.clientTLS()}}
	resp, err := client.Get("https://" + hs.Listener.Addr().String() + "/other")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
}

func TestRefusedConnect(t *testing.T) {
	f := newFixture(t)
	_, err := f.connect(t, "ssl://"+f.addr, "refuse")
	require.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
}

func TestSubscribeRefusal(t *testing.T) {
	f := newFixture(t)
	c, err := f.connect(t, "ssl://"+f.addr, "user")
	require.NoError(t, err)
	tok := c.Subscribe("forbidden", 1, nil)
	require.True(t, tok.WaitTimeout(5*time.Second))
	assert.Equal(t, byte(0x80), tok.(*mqtt.SubscribeToken).Result()["forbidden"])
}

func TestHandlerErrorClosesConnection(t *testing.T) {
	f := newFixture(t)
	c, err := f.connect(t, "ssl://"+f.addr, "user")
	require.NoError(t, err)
	c.Publish("req/x", 2, false, []byte("qos2"))
	select {
	case err := <-f.handler.disconnected:
		assert.ErrorContains(t, err, "QoS 2")
	case <-time.After(5 * time.Second):
		t.Fatal("connection not closed after the handler refused the publish")
	}
}

// rawSession opens a TLS connection and completes CONNECT by hand, for what paho won't send.
func rawSession(t *testing.T, f *fixture, keepAlive uint16) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", f.addr, f.clientTLS())
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion, cp.ClientIdentifier, cp.Keepalive = "MQTT", 4, "device-1", keepAlive
	require.NoError(t, cp.Write(conn))
	ack, err := packets.ReadPacket(conn)
	require.NoError(t, err)
	require.Equal(t, byte(packets.Accepted), ack.(*packets.ConnackPacket).ReturnCode)
	return conn
}

func TestOversizedPacketClosesBeforeReading(t *testing.T) {
	f := newFixture(t)
	conn := rawSession(t, f, 0)
	// A PUBLISH header announcing 200 MB; only the header is sent.
	_, err := conn.Write([]byte{0x30, 0x80, 0x80, 0x80, 0x60})
	require.NoError(t, err)
	select {
	case err := <-f.handler.disconnected:
		assert.ErrorContains(t, err, "exceeds the limit")
	case <-time.After(5 * time.Second):
		t.Fatal("oversized packet did not close the connection")
	}
}

func TestKeepAliveExpiry(t *testing.T) {
	f := newFixture(t)
	start := time.Now()
	rawSession(t, f, 1)
	select {
	case err := <-f.handler.disconnected:
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout())
		assert.GreaterOrEqual(t, time.Since(start), 1500*time.Millisecond)
	case <-time.After(5 * time.Second):
		t.Fatal("silent client not disconnected after 1.5 keep-alive periods")
	}
}

func TestBadProtocolVersionRefused(t *testing.T) {
	f := newFixture(t)
	conn, err := tls.Dial("tcp", f.addr, f.clientTLS())
	require.NoError(t, err)
	defer conn.Close()
	cp := packets.NewControlPacket(packets.Connect).(*packets.ConnectPacket)
	cp.ProtocolName, cp.ProtocolVersion, cp.ClientIdentifier = "MQTT", 5, "device-1"
	require.NoError(t, cp.Write(conn))
	ack, err := packets.ReadPacket(conn)
	require.NoError(t, err)
	assert.Equal(t, byte(packets.ErrRefusedBadProtocolVersion), ack.(*packets.ConnackPacket).ReturnCode)
}

func TestUntrustedClientCertificateFailsHandshake(t *testing.T) {
	f := newFixture(t)
	other, err := pki.NewRoot("other CA")
	require.NoError(t, err)
	stranger, err := other.NewDevice("stranger")
	require.NoError(t, err)
	cfg := f.clientTLS()
	cfg.Certificates = []tls.Certificate{stranger.TLSCertificate()}
	conn, err := tls.Dial("tcp", f.addr, cfg)
	if err == nil {
		// TLS 1.3 reports the server's refusal on the first read.
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	require.Error(t, err)
	var ue x509.UnknownAuthorityError
	assert.False(t, errors.As(err, &ue), "the client trusts the server; the server refuses the client")
}

func TestCloseEndsConnections(t *testing.T) {
	f := newFixture(t)
	_, err := f.connect(t, "ssl://"+f.addr, "user")
	require.NoError(t, err)
	require.NoError(t, f.srv.Close())
	select {
	case <-f.handler.disconnected:
	case <-time.After(5 * time.Second):
		t.Fatal("Close left a connection open")
	}
}
