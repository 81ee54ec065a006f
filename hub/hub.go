// Package hub keeps this device's one MQTT session with its Azure IoT Hub: telemetry through
// a bounded queue that survives reconnects, cloud-to-device messages, the device twin and
// direct methods, reconnecting with backoff by itself, and asks the hub for a renewed
// certificate when told to (IssueCertificate). It does not provision and stores nothing: a
// hub that refuses the identity ends Run with a *ConnectError matching ErrNotAuthorized,
// and the caller re-registers through DPS.
package hub

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/unicity-iot/unicity/internal/backoff"
	"github.com/unicity-iot/unicity/internal/clock"
	"github.com/unicity-iot/unicity/internal/dial"
	"github.com/unicity-iot/unicity/internal/version"
	"github.com/unicity-iot/unicity/sas"
)

// apiVersion is the IoT Hub MQTT API the agent speaks (protocol.md §5.2).
const apiVersion = "2021-04-12"

// Defaults for Config fields left zero.
const (
	// DefaultKeepAlive is the Embedded C SDK's; the hub allows up to MaxKeepAlive.
	DefaultKeepAlive = 240 * time.Second
	// MaxKeepAlive is the longest useful keep-alive: the hub drops a client after 1.5× its
	// keep-alive, capped at 1767 s.
	MaxKeepAlive          = 1177 * time.Second
	DefaultRequestTimeout = 60 * time.Second
	// DefaultMethodTimeout is the hub's longest method response timeout; a caller has given
	// up by then.
	DefaultMethodTimeout = 300 * time.Second
	DefaultWriteTimeout  = 30 * time.Second
	// DefaultTokenLifetime is the Azure SDKs' SAS token lifetime: long enough that renewals
	// are rare, short enough that a leaked token is soon worthless.
	DefaultTokenLifetime = time.Hour
)

const (
	connectTimeout = 30 * time.Second // MQTT handshake after dial's own bound
	pingTimeout    = 30 * time.Second
	// inflightWindow bounds telemetry published and not yet acknowledged on one connection.
	inflightWindow = 32
	// maxMethods bounds method calls handled at once; more are answered 429 at once.
	maxMethods = 16
	// stableSession is how long a connection must last for the next one to start the
	// backoff afresh.
	stableSession = 30 * time.Second
	// methodDrain is how long shutdown waits for method handlers to answer before it
	// disconnects, so that a call that triggered the shutdown gets its answer.
	methodDrain = 5 * time.Second
)

// Topic filters the session subscribes to (protocol.md §5.4–5.6): four, and the
// credentials answers with CertificateRenewal, within the hub's limit of five.
const (
	twinResPrefix      = "$iothub/twin/res/"
	desiredPatchPrefix = "$iothub/twin/PATCH/properties/desired/"
	methodPrefix       = "$iothub/methods/POST/"
)

// Config describes the session. Hub, DeviceID and either Dial.Certificate or Signer
// are required; the handlers are optional.
type Config struct {
	// Hub is the assigned hub exactly as DPS returned it; it may carry a port (the emulator).
	Hub      string
	DeviceID string
	// ModelID is the IoT Plug and Play model announced on connect; empty for none.
	ModelID string
	// Dial says how to reach the hub (transport, proxy, roots, client certificate); its Host
	// is ignored in favour of Hub.
	Dial dial.Config
	// Signer, when set, authenticates the device with SAS tokens it signs: the device key of
	// symmetric-key attestation (attest.SymmetricKey) or TPM attestation's key in the TPM
	// (attest.HMACKey),
	// (the device key, decoded) instead of a client certificate. Every connection presents a
	// fresh token valid for TokenLifetime, and, since the hub disconnects a device whose
	// token expires, the session reconnects with a new token before that.
	Signer sas.Signer
	// TokenLifetime is a SAS token's validity; zero means DefaultTokenLifetime. Sessions
	// are renewed after four fifths of it.
	TokenLifetime time.Duration
	// Clock dates SAS tokens, times their renewal and paces reconnects; nil means the
	// system clock.
	Clock clock.Clock
	// KeepAlive is the MQTT keep-alive; zero means DefaultKeepAlive, more than MaxKeepAlive
	// is capped.
	KeepAlive time.Duration
	// Backoff paces reconnection; nil means full jitter under a ceiling that doubles from
	// 1 s to 100 s, the Embedded C SDK's bounds.
	Backoff Backoff
	// MaxFailures ends Run with ErrGaveUp after this many failed connection attempts in a
	// row (a connection that drops within 30 s counts as one); zero retries for ever.
	MaxFailures int
	// RequestTimeout bounds a twin request, waiting for the connection included.
	RequestTimeout time.Duration
	// MethodTimeout bounds one direct method handler.
	MethodTimeout time.Duration
	// WriteTimeout bounds writing one packet; zero means DefaultWriteTimeout. paho also
	// holds a publish or subscribe that races a dying connection for that long: neither the
	// next connection nor Run's return waits for it (its goroutine ends by itself), so the
	// agent stops within its budget, and a slow link still gets time to write a large message.
	WriteTimeout time.Duration
	// Queue holds outgoing telemetry; nil gives the client its own default-sized queue.
	Queue *Queue

	// OnMessage receives cloud-to-device messages in order, on the client's dispatch
	// goroutine (shared with OnDesired). It may wait, until ctx ends (Run is returning),
	// for room to keep the message. Returning true completes the hub's copy; false leaves it
	// pending, and the hub delivers it again on the next connection. Nil leaves every
	// message pending.
	OnMessage func(ctx context.Context, m Message) bool
	// OnDesired receives desired-property patches, and after every (re)connect a full
	// desired section when its version moved while the device was away.
	OnDesired func(Desired)
	// OnMethod answers a direct method; it runs on its own goroutine with a context that
	// ends at MethodTimeout or when Run returns. Nil answers every method 501.
	OnMethod func(ctx context.Context, call MethodCall) MethodResponse
	// OnState is told of every connection state change, on Run's goroutine; it must not
	// block or call Run.
	OnState func(State)

	// CertificateRenewal subscribes the session to the hub's certificate answers, so that
	// IssueCertificate can be used (credentials.go); a hub that refuses the subscription
	// then fails the session. It also sends the certificate management api-version.
	CertificateRenewal bool
	// IssueTimeout bounds IssueCertificate's wait for each answer; zero means
	// DefaultIssueTimeout.
	IssueTimeout time.Duration
}

// Backoff returns how long to wait before connection attempt number attempt (1 for the first
// retry after a failure).
type Backoff func(attempt int) time.Duration

// errRenew ends a session whose SAS token is due for renewal; Run reconnects at once.
var errRenew = errors.New("SAS token due for renewal")

// State is the connection as the agent reports it.
type State struct {
	Connected bool
	// Transport is the one that carried the last connection ("mqtt" or "mqtt-ws").
	Transport string
	// Since is when the connection came up or went down.
	Since time.Time
	// Failures counts failed connection attempts in a row, connections that dropped within
	// 30 s included.
	Failures int
	// Err says why the last attempt failed or the last connection ended; nil when connected.
	Err error
	// Retry is the wait before the next attempt, when not connected.
	Retry time.Duration
}

// Client is one device's session with its hub. Telemetry, twin and method calls may be made
// from any goroutine, before or while Run runs; they wait for the connection.
type Client struct {
	cfg      Config
	queue    *Queue
	username string

	mu      sync.Mutex
	running bool
	cur     *conn         // nil while disconnected
	changed chan struct{} // closed and replaced when cur changes, and when Run returns
	// ended is set when Run returns, until it is called again: a request then fails at once
	// (ErrClosed) rather than wait for a connection that no Run will make.
	ended     bool
	state     State
	transport string // the one that worked last, tried first next time
	nextRID   uint64
	pending   map[string]chan response // twin requests by $rid
	desired   int64                    // last desired version delivered
	delivered bool                     // whether any desired version was delivered
	renewal   renewal                  // the certificate request in flight (credentials.go)
}

// New checks cfg and returns a client; Run connects it.
func New(cfg Config) (*Client, error) {
	switch {
	case cfg.Hub == "":
		return nil, errors.New("hub: no hub host")
	case cfg.DeviceID == "":
		return nil, errors.New("hub: no device ID")
	case cfg.Dial.Certificate != nil && cfg.Signer != nil:
		return nil, errors.New("hub: both a client certificate and a SAS signer given; choose one")
	}
	if cfg.TokenLifetime <= 0 {
		cfg.TokenLifetime = DefaultTokenLifetime
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.System{}
	}
	if cfg.KeepAlive <= 0 {
		cfg.KeepAlive = DefaultKeepAlive
	}
	cfg.KeepAlive = min(cfg.KeepAlive, MaxKeepAlive)
	if cfg.Backoff == nil {
		cfg.Backoff = backoff.FullJitter(time.Second, 100*time.Second)
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.MethodTimeout <= 0 {
		cfg.MethodTimeout = DefaultMethodTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.Queue == nil {
		cfg.Queue = NewQueue(0, 0)
	}
	if cfg.IssueTimeout <= 0 {
		cfg.IssueTimeout = DefaultIssueTimeout
	}
	api := apiVersion
	if cfg.CertificateRenewal {
		api = credentialsAPIVersion
	}
	cfg.Dial.Host = cfg.Hub
	return &Client{
		cfg:      cfg,
		queue:    cfg.Queue,
		username: username(cfg.Hub, cfg.DeviceID, cfg.ModelID, api),
		changed:  make(chan struct{}),
		pending:  make(map[string]chan response),
	}, nil
}

// Username is the CONNECT user name for a device (protocol.md §5.2): the hub as assigned,
// the device ID, the API version, the agent as DeviceClientType and the optional model ID.
func Username(hub, deviceID, modelID string) string {
	return username(hub, deviceID, modelID, apiVersion)
}

func username(hub, deviceID, modelID, api string) string {
	u := hub + "/" + deviceID + "/?api-version=" + api +
		"&DeviceClientType=" + url.QueryEscape("unicity/"+version.Version)
	if modelID != "" {
		u += "&model-id=" + url.QueryEscape(modelID)
	}
	return u
}

// Password is the CONNECT password of a SAS device (protocol.md §5.2): a SAS token for the
// resource "{hub}/devices/{deviceId}", signed by signer, valid until expiry.
func Password(ctx context.Context, hub, deviceID string, signer sas.Signer, expiry time.Time) (string, error) {
	return sas.SignedToken(ctx, signer, hub+"/devices/"+deviceID, expiry, "")
}

// Queue returns the client's telemetry queue.
func (c *Client) Queue() *Queue { return c.queue }

// Send queues m and waits until the hub has acknowledged it; see Queue.Send.
func (c *Client) Send(ctx context.Context, m Message) error { return c.queue.Send(ctx, m) }

// State returns the connection state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// AwaitConnection waits until the session is connected and subscribed, or ctx ends.
func (c *Client) AwaitConnection(ctx context.Context) error {
	_, err := c.awaitConn(ctx)
	return err
}

// Run connects and keeps the session up, reconnecting with backoff, until ctx ends (it then
// returns ctx's error), the hub refuses the identity (a *ConnectError; ErrNotAuthorized for
// codes 4 and 5) or MaxFailures attempts failed in a row (ErrGaveUp). Queued telemetry stays
// queued when it returns. Run may be called again after it returned, not concurrently.
func (c *Client) Run(ctx context.Context) error {
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		return errors.New("hub: Run is already running")
	}
	c.running, c.ended = true, false
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running, c.ended = false, true
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	}()

	ctx, cancel := context.WithCancel(ctx)
	r := newRunState(ctx, c)
	defer func() {
		cancel() // ends the dispatcher and method handlers, which wait for it
		r.wait()
	}()

	failures := 0
	down := func(err error, retry time.Duration) {
		c.setState(State{Transport: c.lastTransport(), Since: time.Now(), Failures: failures, Err: err, Retry: retry})
	}
	for {
		up, err := c.session(ctx, r)
		if ctx.Err() != nil {
			failures = 0
			down(ctx.Err(), 0)
			return ctx.Err()
		}
		if errors.Is(err, errRenew) {
			failures = 0
			down(err, 0)
			continue
		}
		// A connection that drops at once (kicked by a twin with the same identity, a hub
		// that accepts and then fails) counts as a failure, so that it backs off too.
		if up >= stableSession {
			failures = 0
		}
		failures++
		var ce *ConnectError
		if errors.As(err, &ce) && !ce.Temporary() {
			down(err, 0)
			return err
		}
		if c.cfg.MaxFailures > 0 && failures >= c.cfg.MaxFailures {
			err = fmt.Errorf("%w after %d attempts: %w", ErrGaveUp, failures, err)
			down(err, 0)
			return err
		}
		wait := c.cfg.Backoff(failures)
		down(err, wait)
		select {
		case <-c.cfg.Clock.After(wait):
		case <-ctx.Done():
			failures = 0
			down(ctx.Err(), 0)
			return ctx.Err()
		}
	}
}

// conn is one MQTT connection; a new paho client is made for each, so that nothing paho
// keeps for a dead connection is ever resent behind the queue's back.
type conn struct {
	mc      mqtt.Client
	lost    chan struct{} // closed when the connection has ended
	endOnce sync.Once
	err     error // why it ended; read after lost is closed
}

// cause says why the connection ended; call it after lost is closed.
func (cn *conn) cause() error {
	if cn.err == nil {
		return errors.New("connection closed")
	}
	return cn.err
}

func (cn *conn) end(err error) {
	cn.endOnce.Do(func() {
		cn.err = err
		close(cn.lost)
	})
}

// session makes one connection and serves it until it ends; up is how long it was up
// (CONNACK accepted and subscriptions granted), zero if it never came up.
func (c *Client) session(ctx context.Context, r *runState) (up time.Duration, err error) {
	cn := &conn{lost: make(chan struct{})}
	var transport string
	var opened openedConn
	dc := c.cfg.Dial
	dc.Prefer = c.lastTransport()
	opts := mqtt.NewClientOptions().
		AddBroker("mqtts://" + c.cfg.Hub). // a label: dial.Opener opens the connection
		SetClientID(c.cfg.DeviceID).
		SetUsername(c.username).
		SetCleanSession(false).
		SetProtocolVersion(4).
		SetKeepAlive(c.cfg.KeepAlive).
		SetPingTimeout(pingTimeout).
		SetConnectTimeout(connectTimeout).
		SetWriteTimeout(c.cfg.WriteTimeout).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(true).
		SetAutoAckDisabled(true).
		SetDefaultPublishHandler(c.inbound(r, cn)).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { cn.end(err) }).
		SetCustomOpenConnectionFn(opened.recording(ctx, dial.Opener(ctx, dc, func(t string) { transport = t })))
	// The token is made for this connection, so that its lifetime starts now; it is signed
	// here, where a TPM that cannot sign ends the attempt with its error (paho's credentials
	// provider could only send an empty password).
	var expiry time.Time
	if c.cfg.Signer != nil {
		expiry = c.cfg.Clock.Now().Add(c.cfg.TokenLifetime)
		password, err := Password(ctx, c.cfg.Hub, c.cfg.DeviceID, c.cfg.Signer, expiry)
		if err != nil {
			return 0, fmt.Errorf("cannot sign the hub's SAS token: %w", err)
		}
		opts.SetPassword(password)
	}
	cn.mc = mqtt.NewClient(opts)

	tok := cn.mc.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		// The dial is bound to ctx, but paho waits for CONNACK up to connectTimeout: closing
		// the connection ends that wait now. Then no connection outlives Run.
		opened.close()
		<-tok.Done()
		if tok.Error() == nil {
			cn.mc.Disconnect(0)
		}
		return 0, ctx.Err()
	}
	if err := tok.Error(); err != nil {
		if rc := tok.(*mqtt.ConnectToken).ReturnCode(); rc != packets.Accepted && rc != packets.ErrNetworkError {
			return 0, &ConnectError{ReturnCode: rc}
		}
		return 0, fmt.Errorf("cannot connect to hub %s: %w", c.cfg.Hub, err)
	}
	c.mu.Lock()
	c.transport = transport
	c.mu.Unlock()

	if err := c.subscribe(ctx, cn); err != nil {
		cn.mc.Disconnect(0)
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		return 0, err
	}

	c.setConn(cn)
	since := time.Now()
	c.setState(State{Connected: true, Transport: transport, Since: since})

	var renew <-chan time.Time
	if c.cfg.Signer != nil {
		renewAt := expiry.Add(-c.cfg.TokenLifetime / 5)
		renew = c.cfg.Clock.After(renewAt.Sub(c.cfg.Clock.Now()))
	}

	sctx, scancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); c.sendLoop(sctx, cn) }()
	go func() { defer wg.Done(); c.resync(sctx, r) }()

	select {
	case <-ctx.Done():
		// Let method handlers answer (unicity.reprovision is answered before the agent
		// disconnects), then say goodbye.
		r.drainMethods(methodDrain)
		c.setConn(nil)
		cn.mc.Disconnect(250)
		cn.end(ctx.Err())
		err = ctx.Err()
	case <-cn.lost:
		c.setConn(nil)
		cn.mc.Disconnect(0) // closes the socket when a failed publish, not paho, ended it
		err = fmt.Errorf("connection to hub %s lost: %w", c.cfg.Hub, cn.cause())
	case <-renew:
		// A planned reconnect: method calls in flight get their answer first, unacknowledged
		// telemetry is requeued below and sent again on the new connection.
		r.drainMethods(methodDrain)
		c.setConn(nil)
		cn.mc.Disconnect(250)
		cn.end(errRenew)
		err = errRenew
	}
	scancel()
	wg.Wait()
	c.queue.requeue()
	return max(time.Since(since), time.Nanosecond), err
}

// openedConn is the connection paho opened for a session, so that it can be closed when ctx
// ends before CONNACK.
type openedConn struct {
	mu     sync.Mutex
	nc     net.Conn
	closed bool
}

// recording opens with open and records the connection; one that opens after close is
// closed at once.
func (o *openedConn) recording(ctx context.Context, open mqtt.OpenConnectionFunc) mqtt.OpenConnectionFunc {
	return func(u *url.URL, opts mqtt.ClientOptions) (net.Conn, error) {
		nc, err := open(u, opts)
		if err != nil {
			return nil, err
		}
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.closed {
			nc.Close()
			return nil, ctx.Err()
		}
		o.nc = nc
		return nc, nil
	}
}

func (o *openedConn) close() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	if o.nc != nil {
		o.nc.Close()
	}
}

func (c *Client) subscribe(ctx context.Context, cn *conn) error {
	filters := map[string]byte{
		"devices/" + c.cfg.DeviceID + "/messages/devicebound/#": 1,
		twinResPrefix + "#":      1,
		desiredPatchPrefix + "#": 1,
		methodPrefix + "#":       0,
	}
	if c.cfg.CertificateRenewal {
		filters[credentialsResPrefix+"#"] = 1
	}
	tok, err := c.handoff(ctx, cn, func() mqtt.Token { return cn.mc.SubscribeMultiple(filters, nil) })
	if err == nil {
		select {
		case <-tok.Done():
		case <-cn.lost:
			err = cn.cause()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if err != nil {
		return fmt.Errorf("connection to hub %s lost while subscribing: %w", c.cfg.Hub, err)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("cannot subscribe at hub %s: %w", c.cfg.Hub, err)
	}
	for filter, code := range tok.(*mqtt.SubscribeToken).Result() {
		refused := code == packets.ErrProtocolViolation || code > 2
		if filter == credentialsResPrefix+"#" {
			// A hub not linked to certificate management: the session serves all the same,
			// and IssueCertificate says why it cannot, so that the device renews through
			// DPS rather than going dark (Microsoft's C client fails the session).
			c.renewal.refused.Store(refused)
			continue
		}
		if refused {
			return fmt.Errorf("hub %s refused the subscription to %s", c.cfg.Hub, filter)
		}
	}
	return nil
}

// sendLoop publishes queued telemetry in order, up to inflightWindow unacknowledged, until
// the connection or ctx ends. Entries are acknowledged in the queue as their PUBACKs come.
func (c *Client) sendLoop(ctx context.Context, cn *conn) {
	type flight struct {
		e   *entry
		tok mqtt.Token
	}
	flights := make(chan flight, inflightWindow)
	ackerDone := make(chan struct{})
	go func() {
		defer close(ackerDone)
		for f := range flights {
			select {
			case <-f.tok.Done():
			case <-cn.lost:
				return
			}
			if err := f.tok.Error(); err != nil {
				cn.end(fmt.Errorf("cannot publish telemetry: %w", err))
				return
			}
			c.queue.ack(f.e)
		}
	}()
loop:
	for {
		e, ok := c.queue.next(ctx, cn.lost)
		if !ok {
			break
		}
		tok, err := c.handoff(ctx, cn, func() mqtt.Token {
			return cn.mc.Publish(eventsTopic(c.cfg.DeviceID, e.msg.Properties), 1, false, e.msg.Payload)
		})
		if err != nil {
			break
		}
		select {
		case flights <- flight{e, tok}:
		case <-cn.lost:
			break loop
		case <-ctx.Done():
			break loop
		}
	}
	close(flights)
	<-ackerDone
}

// handoff makes a paho call that hands a packet to the connection's writer. paho blocks such
// a call for up to WriteTimeout when the connection dies under it (nobody takes the packet
// any more), so it runs on its own goroutine, and handoff stops waiting for it when the
// connection or ctx ends. Nobody waits for that goroutine, not even Run before it returns:
// it only hands its token to a buffer nobody reads, and ends within WriteTimeout.
func (c *Client) handoff(ctx context.Context, cn *conn, call func() mqtt.Token) (mqtt.Token, error) {
	handed := make(chan mqtt.Token, 1)
	go func() { handed <- call() }()
	select {
	case tok := <-handed:
		return tok, nil
	case <-cn.lost:
		return nil, cn.cause()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c *Client) setConn(cn *conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = cn
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *Client) current() *conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

func (c *Client) awaitConn(ctx context.Context) (*conn, error) {
	return c.nextConn(ctx, nil)
}

// nextConn waits for a connection other than dead (nil for any), while Run runs or until it
// is called.
func (c *Client) nextConn(ctx context.Context, dead *conn) (*conn, error) {
	for {
		c.mu.Lock()
		cn, changed, ended := c.cur, c.changed, c.ended
		c.mu.Unlock()
		if cn != nil && cn != dead {
			return cn, nil
		}
		if ended {
			return nil, fmt.Errorf("%w: %s", ErrClosed, c.cfg.Hub)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (c *Client) lastTransport() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.transport
}

func (c *Client) setState(s State) {
	c.mu.Lock()
	c.state = s
	c.mu.Unlock()
	if c.cfg.OnState != nil {
		c.cfg.OnState(s)
	}
}

func (c *Client) newRID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextRID++
	return strconv.FormatUint(c.nextRID, 10)
}
