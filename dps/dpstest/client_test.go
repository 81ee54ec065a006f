package dpstest_test

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// This file is a minimal DPS device client over paho, enough to drive the emulator through
// every request variant of protocol.md; the real client lives in package dps.

const (
	resFilter     = "$dps/registrations/res/#"
	registerTopic = "$dps/registrations/PUT/iotdps-register/?$rid="
	pollTopic     = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="
	apiVersion    = "2019-03-31"
	waitTimeout   = 10 * time.Second
)

// device is one connected device.
type device struct {
	t      testing.TB
	client mqtt.Client
	msgs   chan mqtt.Message
	lost   chan error
	rid    atomic.Int64
}

type dialOpts struct {
	regID     string
	username  string // default: scope/registrations/regID/api-version=2019-03-31
	api       string // api-version in the default username
	cert      *tls.Certificate
	password  string
	webSocket bool
	subQoS    byte
	noSub     bool
}

// dial connects and subscribes; it returns the CONNACK error, if any, as *connectError.
func dial(t testing.TB, s *dpstest.Server, o dialOpts) (*device, error) {
	t.Helper()
	if o.username == "" {
		api := o.api
		if api == "" {
			api = apiVersion
		}
		o.username = s.IDScope() + "/registrations/" + o.regID + "/api-version=" + api
	}
	tlsConf := &tls.Config{RootCAs: s.RootCAs(), ServerName: dpstest.GlobalHost, MinVersion: tls.VersionTLS12}
	if o.cert != nil {
		tlsConf.Certificates = []tls.Certificate{*o.cert}
	}
	d := &device{t: t, msgs: make(chan mqtt.Message, 16), lost: make(chan error, 1)}
	opts := mqtt.NewClientOptions().
		SetClientID(o.regID).SetUsername(o.username).SetPassword(o.password).
		SetCleanSession(true).SetProtocolVersion(4).SetAutoReconnect(false).
		SetKeepAlive(60 * time.Second).SetTLSConfig(tlsConf).
		SetConnectTimeout(waitTimeout).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { d.lost <- err })
	if o.webSocket {
		opts.AddBroker(s.WebSocketURL())
	} else {
		opts.AddBroker("ssl://" + s.Addr())
	}
	d.client = mqtt.NewClient(opts)
	tok := d.client.Connect()
	if !tok.WaitTimeout(waitTimeout) {
		t.Fatal("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, &connectError{code: tok.(*mqtt.ConnectToken).ReturnCode(), err: err}
	}
	t.Cleanup(func() { d.client.Disconnect(0) })
	if !o.noSub {
		d.subscribe(resFilter, o.subQoS)
	}
	return d, nil
}

type connectError struct {
	code byte
	err  error
}

func (e *connectError) Error() string { return fmt.Sprintf("CONNACK %d: %v", e.code, e.err) }

// mustDial connects a device that must be accepted.
func mustDial(t testing.TB, s *dpstest.Server, o dialOpts) *device {
	t.Helper()
	d, err := dial(t, s, o)
	require.NoError(t, err)
	return d
}

// subscribe returns the granted QoS.
func (d *device) subscribe(filter string, qos byte) byte {
	d.t.Helper()
	tok := d.client.Subscribe(filter, qos, func(_ mqtt.Client, m mqtt.Message) { d.msgs <- m })
	require.True(d.t, tok.WaitTimeout(waitTimeout), "subscribe timed out")
	require.NoError(d.t, tok.Error())
	return tok.(*mqtt.SubscribeToken).Result()[filter]
}

func (d *device) publish(topic string, qos byte, body string) {
	d.t.Helper()
	tok := d.client.Publish(topic, qos, false, body)
	require.True(d.t, tok.WaitTimeout(waitTimeout), "publish timed out")
	require.NoError(d.t, tok.Error())
}

// response is one DPS response as a client sees it.
type response struct {
	topic      string
	qos        byte
	status     int
	rid        string
	retryAfter int // -1 when absent
	raw        []byte
	body       struct {
		OperationID       string `json:"operationId"`
		Status            string `json:"status"`
		ErrorCode         int    `json:"errorCode"`
		Message           string `json:"message"`
		TrackingID        string `json:"trackingId"`
		RegistrationState *struct {
			RegistrationID         string          `json:"registrationId"`
			CreatedDateTimeUTC     string          `json:"createdDateTimeUtc"`
			LastUpdatedDateTimeUTC string          `json:"lastUpdatedDateTimeUtc"`
			AssignedHub            string          `json:"assignedHub"`
			DeviceID               string          `json:"deviceId"`
			Status                 string          `json:"status"`
			Substatus              string          `json:"substatus"`
			ETag                   string          `json:"etag"`
			ErrorCode              int             `json:"errorCode"`
			ErrorMessage           string          `json:"errorMessage"`
			Payload                json.RawMessage `json:"payload"`
			X509                   *struct{}       `json:"x509"`
			IssuedCertificateChain []string        `json:"issuedCertificateChain"`
			ConnectionProfile      *string         `json:"connectionProfile"`
		} `json:"registrationState"`
	}
}

// topicRE is the strict form the emulator must emit (protocol.md §2.4).
var topicRE = regexp.MustCompile(`^\$dps/registrations/res/(\d{3})/\?\$rid=([^&]*)(?:&retry-after=(\d+))?$`)

// next waits for the next response; it fails the test on a topic of the wrong form.
func (d *device) next() response {
	d.t.Helper()
	select {
	case m := <-d.msgs:
		r := response{topic: m.Topic(), qos: m.Qos(), raw: m.Payload(), retryAfter: -1}
		g := topicRE.FindStringSubmatch(m.Topic())
		require.NotNil(d.t, g, "response topic %q", m.Topic())
		r.status, _ = strconv.Atoi(g[1])
		r.rid = g[2]
		if g[3] != "" {
			r.retryAfter, _ = strconv.Atoi(g[3])
		}
		if len(r.raw) > 0 {
			if err := json.Unmarshal(r.raw, &r.body); err != nil {
				r.body.Status = "<unparsable>"
			}
		}
		return r
	case err := <-d.lost:
		d.t.Fatalf("connection lost waiting for a response: %v", err)
	case <-time.After(waitTimeout):
		d.t.Fatal("no response")
	}
	return response{}
}

// quiet asserts that no response arrives for a short while.
func (d *device) quiet(within time.Duration) {
	d.t.Helper()
	select {
	case m := <-d.msgs:
		d.t.Fatalf("unexpected response %q %s", m.Topic(), m.Payload())
	case <-time.After(within):
	}
}

// closed waits for the server to close the connection.
func (d *device) closed() error {
	d.t.Helper()
	select {
	case err := <-d.lost:
		return err
	case <-time.After(waitTimeout):
		d.t.Fatal("connection not closed")
	}
	return nil
}

func (d *device) nextRID() string { return strconv.FormatInt(d.rid.Add(1), 10) }

// register sends a compact register request and returns the response.
func (d *device) register(regID string) response {
	d.t.Helper()
	d.publish(registerTopic+d.nextRID(), 1, `{"registrationId":"`+regID+`"}`)
	return d.next()
}

// poll sends an operation status request with an empty body.
func (d *device) poll(opID string) response {
	d.t.Helper()
	d.publish(pollTopic+d.nextRID()+"&operationId="+url.QueryEscape(opID), 1, "")
	return d.next()
}

// provision registers and polls until a terminal status; the server must run with
// retry-after 0 and no assignment delay.
func (d *device) provision(regID string) response {
	d.t.Helper()
	r := d.register(regID)
	for i := 0; r.status == 202; i++ {
		require.Less(d.t, i, 3, "still assigning")
		r = d.poll(r.body.OperationID)
	}
	return r
}

// fast is the configuration for tests that do not study timing.
func fast(c *dpstest.Config) {
	c.RetryAfter = 0
	c.AssignDelay = 0
	c.PollLimit = 0
}

// clock is a settable clock for Config.Now.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Now()} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// assignments records what a Registrar is told.
type assignments struct {
	mu  sync.Mutex
	all []dpstest.Assignment
}

func (a *assignments) Assign(x dpstest.Assignment) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.all = append(a.all, x)
	return nil
}

func (a *assignments) last(t testing.TB) dpstest.Assignment {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	require.NotEmpty(t, a.all, "no assignment")
	return a.all[len(a.all)-1]
}
