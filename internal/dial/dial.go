// Package dial opens the network connection a DPS or IoT Hub client runs over: MQTT over TLS
// on 8883, MQTT over a TLS WebSocket on 443, or (for DPS's REST API) plain TLS on 443, directly
// or through an HTTP CONNECT proxy. It builds the TLS configuration (Azure's roots plus an
// optional extra bundle, TLS 1.2 floor, the device's client certificate). It speaks neither
// MQTT nor HTTP, but it bounds the size of the MQTT packets read from the connection, since
// the MQTT codec would allocate any announced size. Shared by dps and hub.
package dial

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"golang.org/x/net/http/httpproxy"
)

// Transports, as spelled in the config file.
const (
	TransportMQTT      = "mqtt"    // MQTT over TLS, port 8883
	TransportWebSocket = "mqtt-ws" // MQTT over a TLS WebSocket, port 443
	TransportHTTPS     = "https"   // DPS's REST API over TLS, port 443 (Config.HTTPS)
	TransportAuto      = "auto"    // 8883, falling back to the WebSocket (then HTTPS) when blocked
)

const (
	portMQTT      = "8883"
	portWebSocket = "443"
	portHTTPS     = "443"
	// websocketPath is where Azure (and the emulator) serve MQTT over WebSocket.
	websocketPath = "/$iothub/websocket"
	// DefaultTimeout bounds one connection attempt (TCP, proxy, TLS and WebSocket handshakes).
	DefaultTimeout = 20 * time.Second
	// fallbackAfter bounds the first attempt in auto mode.
	fallbackAfter = 10 * time.Second
)

// ErrUnreachable marks a failure to open the connection: DNS, TCP, proxy, TLS or WebSocket.
// Cancellation of the caller's context is not marked.
var ErrUnreachable = errors.New("endpoint unreachable")

// Config says where and how to connect.
type Config struct {
	// Host is the endpoint's DNS name, optionally with a port ("host:port"); an explicit port
	// is used for whichever transport is chosen.
	Host string
	// Transport is TransportMQTT, TransportWebSocket or TransportAuto; empty means auto.
	Transport string
	// Prefer is the transport that worked last time (Dial's second result); auto tries it first.
	Prefer string
	// HTTPS says the caller speaks DPS's REST API as well as MQTT: TransportHTTPS is then a
	// transport of its own, the last that auto tries. A caller that speaks only MQTT (IoT
	// Hub) takes TransportHTTPS, configured or preferred, for the WebSocket: the transport
	// that goes the way HTTPS went, to port 443 through the same proxy.
	HTTPS bool
	// Proxy is the http:// URL of an HTTP CONNECT proxy, with optional user:password for basic
	// auth. Empty: https_proxy/HTTPS_PROXY from the environment, honouring NO_PROXY.
	Proxy string
	// RootCAs verifies the server; nil means Azure's roots (see RootPool for adding a bundle).
	RootCAs *x509.CertPool
	// Certificate is the device's client chain and signer; nil for SAS authentication.
	Certificate *tls.Certificate
	// Timeout bounds one attempt; zero means DefaultTimeout.
	Timeout time.Duration
	// MaxPacket bounds an incoming MQTT packet (bytes); a larger one ends the connection with
	// ErrPacketTooLarge. Zero means DefaultMaxPacket.
	MaxPacket int
}

// Dial connects to cfg.Host and returns the connection and the transport that carried it, to
// be stored and passed back as cfg.Prefer next time. In auto mode a failure on 8883 (refused,
// reset, timed out, TLS) falls back to the WebSocket on 443, and a failed WebSocket handshake
// to HTTPS when cfg.HTTPS. An MQTT connection is bounded by cfg.MaxPacket; an HTTPS one is
// the bare TLS connection.
func Dial(ctx context.Context, cfg Config) (net.Conn, string, error) {
	order, err := cfg.order()
	if err != nil {
		return nil, "", err
	}
	attempts := make([]attempt, len(order))
	for i, transport := range order {
		if attempts[i], err = cfg.plan(transport); err != nil {
			return nil, "", err
		}
	}
	var errs []error
	for i, a := range attempts {
		if i < len(attempts)-1 {
			// A firewall that drops packets to 8883 should not hold up the fallback long.
			a.timeout = min(a.timeout, fallbackAfter)
		}
		conn, err := a.dial(ctx)
		if err == nil && a.transport == TransportHTTPS {
			return conn, a.transport, nil
		}
		if err == nil {
			return limitPackets(conn, cfg.MaxPacket), a.transport, nil
		}
		if ctx.Err() != nil {
			return nil, "", fmt.Errorf("cannot connect to %s: %w", cfg.Host, context.Cause(ctx))
		}
		errs = append(errs, err)
	}
	return nil, "", &unreachableError{errors.Join(errs...)}
}

// Opener adapts Dial to paho's ClientOptions.SetCustomOpenConnectionFn. ctx bounds every
// connection paho opens through it; worked, if not nil, learns each connection's transport.
func Opener(ctx context.Context, cfg Config, worked func(transport string)) mqtt.OpenConnectionFunc {
	return func(*url.URL, mqtt.ClientOptions) (net.Conn, error) {
		conn, transport, err := Dial(ctx, cfg)
		if err == nil && worked != nil {
			worked(transport)
		}
		return conn, err
	}
}

type unreachableError struct{ err error }

func (e *unreachableError) Error() string   { return e.err.Error() }
func (e *unreachableError) Unwrap() []error { return []error{ErrUnreachable, e.err} }

func (cfg Config) order() ([]string, error) {
	if cfg.Host == "" {
		return nil, errors.New("no endpoint host configured")
	}
	auto := []string{TransportMQTT, TransportWebSocket}
	if cfg.HTTPS {
		auto = append(auto, TransportHTTPS)
	}
	switch cfg.Transport {
	case TransportMQTT, TransportWebSocket:
		return []string{cfg.Transport}, nil
	case TransportHTTPS:
		return []string{cfg.speakable(TransportHTTPS)}, nil
	case "", TransportAuto:
		prefer := cfg.speakable(cfg.Prefer)
		i := slices.Index(auto, prefer)
		if i <= 0 {
			return auto, nil
		}
		return append([]string{prefer}, slices.Delete(auto, i, i+1)...), nil
	default:
		return nil, fmt.Errorf("unknown transport %q (want %s, %s, %s or %s)", cfg.Transport, TransportAuto, TransportMQTT, TransportWebSocket, TransportHTTPS)
	}
}

// speakable is the transport the caller can speak that stands for transport.
func (cfg Config) speakable(transport string) string {
	if transport == TransportHTTPS && !cfg.HTTPS {
		return TransportWebSocket
	}
	return transport
}

// target splits cfg.Host into the TLS server name and the address to connect to.
func (cfg Config) target(transport string) (serverName, addr string, err error) {
	if host, port, err := net.SplitHostPort(cfg.Host); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return "", "", fmt.Errorf("endpoint %q: invalid port %q", cfg.Host, port)
		}
		return host, cfg.Host, nil
	}
	host := strings.TrimSuffix(strings.TrimPrefix(cfg.Host, "["), "]")
	port := portMQTT
	switch transport {
	case TransportWebSocket:
		port = portWebSocket
	case TransportHTTPS:
		port = portHTTPS
	}
	return host, net.JoinHostPort(host, port), nil
}

// attempt is one way to reach the endpoint, checked before any is tried.
type attempt struct {
	transport string
	addr      string
	proxy     *url.URL
	tls       *tls.Config
	timeout   time.Duration
}

func (cfg Config) plan(transport string) (attempt, error) {
	serverName, addr, err := cfg.target(transport)
	if err != nil {
		return attempt{}, err
	}
	proxy, err := cfg.proxyFor(addr)
	if err != nil {
		return attempt{}, err
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return attempt{transport: transport, addr: addr, proxy: proxy, tls: cfg.tlsConfig(serverName), timeout: timeout}, nil
}

func (a attempt) dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	var conn net.Conn
	var err error
	if a.transport == TransportWebSocket {
		conn, err = dialWebSocket(ctx, a.addr, a.tls, a.proxy)
	} else {
		conn, err = dialTLS(ctx, a.addr, a.tls, a.proxy)
	}
	if err != nil {
		via := ""
		if a.proxy != nil {
			via = " via proxy " + a.proxy.Host
		}
		return nil, fmt.Errorf("cannot connect to %s (%s%s): %w", a.addr, a.transport, via, err)
	}
	return conn, nil
}

func dialTLS(ctx context.Context, addr string, tlsc *tls.Config, proxy *url.URL) (net.Conn, error) {
	var raw net.Conn
	var err error
	if proxy != nil {
		raw, err = connectThrough(ctx, proxy, addr)
	} else {
		var d net.Dialer
		raw, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	conn := tls.Client(raw, tlsc)
	if err := conn.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

// dialWebSocket reuses paho's WebSocket adapter. That has no context, so the handshake runs
// in a goroutine bounded by ctx's deadline; if ctx is cancelled first, Dial returns at once
// and the goroutine lives on until the handshake ends (at most that deadline), then closes
// whatever it got.
func dialWebSocket(ctx context.Context, addr string, tlsc *tls.Config, proxy *url.URL) (net.Conn, error) {
	timeout := DefaultTimeout
	if deadline, ok := ctx.Deadline(); ok {
		timeout = time.Until(deadline)
	}
	if timeout <= 0 {
		return nil, context.DeadlineExceeded
	}
	wsURL := (&url.URL{Scheme: "wss", Host: addr, Path: websocketPath}).String()
	opts := &mqtt.WebsocketOptions{Proxy: func(*http.Request) (*url.URL, error) { return proxy, nil }}
	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result)
	go func() {
		conn, err := mqtt.NewWebsocket(wsURL, tlsc, timeout, nil, opts)
		select {
		case done <- result{conn, err}:
		case <-ctx.Done():
			if conn != nil {
				conn.Close()
			}
		}
	}()
	select {
	case r := <-done:
		return r.conn, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// connectThrough opens a tunnel to addr through an HTTP CONNECT proxy.
func connectThrough(ctx context.Context, proxy *url.URL, addr string) (net.Conn, error) {
	proxyAddr := proxy.Host
	if proxy.Port() == "" {
		proxyAddr = net.JoinHostPort(proxy.Hostname(), "80")
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", proxyAddr)
	if err != nil {
		return nil, fmt.Errorf("cannot reach proxy: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	fail := func(err error) (net.Conn, error) {
		stop()
		conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}

	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: addr},
		Host:   addr,
		Header: make(http.Header),
	}
	if u := proxy.User; u != nil {
		password, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+password)))
	}
	if err := req.Write(conn); err != nil {
		return fail(fmt.Errorf("proxy: %w", err))
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fail(fmt.Errorf("proxy: %w", err))
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		if resp.StatusCode == http.StatusProxyAuthRequired {
			return fail(fmt.Errorf("proxy %s requires authentication (%s); put user:password in the proxy URL", proxy.Host, resp.Status))
		}
		return fail(fmt.Errorf("proxy %s refused the tunnel to %s: %s", proxy.Host, addr, resp.Status))
	}
	if !stop() {
		conn.Close()
		return nil, ctx.Err()
	}
	conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// bufferedConn keeps bytes a proxy sent right after its CONNECT reply.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// proxyFor returns the proxy for addr, or nil to connect directly.
func (cfg Config) proxyFor(addr string) (*url.URL, error) {
	var u *url.URL
	if cfg.Proxy != "" {
		var err error
		if u, err = url.Parse(cfg.Proxy); err != nil {
			return nil, fmt.Errorf("invalid proxy URL: %w", err)
		}
	} else {
		var err error
		u, err = httpproxy.FromEnvironment().ProxyFunc()(&url.URL{Scheme: "https", Host: addr})
		if err != nil {
			return nil, fmt.Errorf("invalid https_proxy: %w", err)
		}
		if u == nil {
			return nil, nil
		}
	}
	if u.Scheme != "http" || u.Host == "" {
		return nil, fmt.Errorf("proxy %q: want an http://host:port URL of an HTTP CONNECT proxy", u.Redacted())
	}
	return u, nil
}

func (cfg Config) tlsConfig(serverName string) *tls.Config {
	roots := cfg.RootCAs
	if roots == nil {
		roots = AzureRoots()
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: serverName}
	if cert := cfg.Certificate; cert != nil {
		// Always offer the identity: DPS and IoT Hub do not name acceptable CAs, and Go would
		// otherwise send no certificate at all.
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		if pkcs1Only(cert.SupportedSignatureAlgorithms) {
			// TLS 1.3 requires RSA-PSS, which this key cannot produce.
			c.MaxVersion = tls.VersionTLS12
		}
	}
	return c
}

func pkcs1Only(schemes []tls.SignatureScheme) bool {
	if len(schemes) == 0 {
		return false
	}
	for _, s := range schemes {
		switch s {
		case tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512, tls.PKCS1WithSHA1:
		default:
			return false
		}
	}
	return true
}
