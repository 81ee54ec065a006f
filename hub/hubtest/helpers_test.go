package hubtest_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"regexp"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/pki"
)

// guidRE is the shape of the IDs Azure makes: a version 4 UUID.
var guidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// fixture is a hub with a factory CA whose devices are registered as CA-signed.
type fixture struct {
	srv     *hubtest.Server
	factory *pki.CA
}

func newFixture(t *testing.T, opts ...hubtest.Option) *fixture {
	t.Helper()
	srv := hubtest.NewServer(t, opts...)
	factory, err := srv.CA.NewIntermediate("factory CA")
	require.NoError(t, err)
	return &fixture{srv: srv, factory: factory}
}

// device registers id as CA-signed under the factory CA and returns its certificate.
func (f *fixture) device(t *testing.T, id string) tls.Certificate {
	t.Helper()
	leaf, err := f.factory.NewDevice(id)
	require.NoError(t, err)
	require.NoError(t, f.srv.Register(hubtest.Device{ID: id, CAs: []*x509.Certificate{f.factory.Certificate}}))
	return leaf.TLSCertificate()
}

// client is a paho connection to the hub with every message it receives on a channel.
type client struct {
	mqtt.Client
	msgs           chan mqtt.Message
	lost           chan error
	sessionPresent bool
}

type clientConfig struct {
	id, username, password string
	cert                   *tls.Certificate
	clean                  bool
	broker                 string // default tls://Addr
	noAutoAck              bool
	tlsServerName          string // default localhost
}

func (f *fixture) username(id string) string {
	return f.srv.Name() + "/" + id + "/?api-version=2021-04-12"
}

// connect dials the hub as cfg says and returns the client and the CONNECT outcome.
func (f *fixture) connect(t *testing.T, cfg clientConfig) (*client, error) {
	t.Helper()
	if cfg.username == "" {
		cfg.username = f.username(cfg.id)
	}
	if cfg.broker == "" {
		cfg.broker = "tls://" + f.srv.Addr
	}
	if cfg.tlsServerName == "" {
		cfg.tlsServerName = "localhost"
	}
	tc := &tls.Config{RootCAs: f.srv.RootCAs(), ServerName: cfg.tlsServerName, MinVersion: tls.VersionTLS12}
	if cfg.cert != nil {
		tc.Certificates = []tls.Certificate{*cfg.cert}
	}
	c := &client{msgs: make(chan mqtt.Message, 100), lost: make(chan error, 1)}
	o := mqtt.NewClientOptions().AddBroker(cfg.broker).SetClientID(cfg.id).SetUsername(cfg.username).
		SetTLSConfig(tc).SetCleanSession(cfg.clean).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).SetProtocolVersion(4).SetOrderMatters(false).SetAutoAckDisabled(cfg.noAutoAck).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) { c.msgs <- m }).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { c.lost <- err })
	if cfg.password != "" {
		o.SetPassword(cfg.password)
	}
	c.Client = mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		t.Fatal("CONNECT timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	c.sessionPresent = tok.(*mqtt.ConnectToken).SessionPresent()
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func (f *fixture) mustConnect(t *testing.T, cfg clientConfig) *client {
	t.Helper()
	c, err := f.connect(t, cfg)
	require.NoError(t, err)
	return c
}

func (c *client) subscribe(t *testing.T, filter string, qos byte) {
	t.Helper()
	tok := c.Subscribe(filter, qos, nil)
	require.True(t, tok.WaitTimeout(10*time.Second))
	require.NoError(t, tok.Error())
}

func (c *client) publish(t *testing.T, topic string, qos byte, payload []byte) {
	t.Helper()
	tok := c.Publish(topic, qos, false, payload)
	require.True(t, tok.WaitTimeout(10*time.Second))
	require.NoError(t, tok.Error())
}

// next returns the next message the client receives.
func (c *client) next(t *testing.T) mqtt.Message {
	t.Helper()
	select {
	case m := <-c.msgs:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message received")
		return nil
	}
}

// waitLost waits for the hub to close the client's connection.
func (c *client) waitLost(t *testing.T) {
	t.Helper()
	select {
	case <-c.lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was not closed")
	}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}
