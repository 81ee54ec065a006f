// Package dialtest runs an HTTP CONNECT proxy on loopback for tests of code that connects
// through package dial: it can demand basic auth, reroute a target (so that a test can reach
// an emulator under Azure's host name and default ports) and block a target outright.
package dialtest

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
)

// Proxy is a running CONNECT proxy. URL carries the credentials when auth is required.
type Proxy struct {
	URL *url.URL

	user, password string
	routes         map[string]string

	mu      sync.Mutex
	tunnels []string
	conns   []net.Conn
	wg      sync.WaitGroup
}

// Option configures NewProxy.
type Option func(*Proxy)

// WithAuth makes the proxy answer 407 unless the request carries these basic credentials.
func WithAuth(user, password string) Option {
	return func(p *Proxy) { p.user, p.password = user, password }
}

// WithRoute tunnels CONNECT requests for target to addr instead; an empty addr blocks the
// target with 403, as a firewall that closes port 8883 would.
func WithRoute(target, addr string) Option {
	return func(p *Proxy) { p.routes[target] = addr }
}

// NewProxy starts a proxy that lives until the test ends.
func NewProxy(t testing.TB, opts ...Option) *Proxy {
	t.Helper()
	p := &Proxy{routes: map[string]string{}}
	for _, o := range opts {
		o(p)
	}
	srv := httptest.NewServer(http.HandlerFunc(p.serve))
	p.URL, _ = url.Parse(srv.URL)
	if p.user != "" {
		p.URL.User = url.UserPassword(p.user, p.password)
	}
	t.Cleanup(func() {
		srv.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// Tunnels lists the targets of the CONNECT requests the proxy accepted, in order.
func (p *Proxy) Tunnels() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.tunnels...)
}

func (p *Proxy) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
		return
	}
	if p.user != "" {
		user, password, ok := parseProxyAuth(r)
		if !ok || user != p.user || password != p.password {
			w.Header().Set("Proxy-Authenticate", `Basic realm="test"`)
			http.Error(w, "bad credentials", http.StatusProxyAuthRequired)
			return
		}
	}
	addr := r.Host
	if to, ok := p.routes[r.Host]; ok {
		if to == "" {
			http.Error(w, "blocked", http.StatusForbidden)
			return
		}
		addr = to
	}
	upstream, err := net.Dial("tcp", addr)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		upstream.Close()
		return
	}
	if _, err := io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		conn.Close()
		upstream.Close()
		return
	}
	p.mu.Lock()
	p.tunnels = append(p.tunnels, r.Host)
	p.conns = append(p.conns, conn, upstream)
	p.wg.Add(2)
	p.mu.Unlock()
	pipe := func(dst, src net.Conn) {
		defer p.wg.Done()
		io.Copy(dst, src)
		dst.Close()
		src.Close()
	}
	go pipe(conn, upstream)
	go pipe(upstream, conn)
}

func parseProxyAuth(r *http.Request) (user, password string, ok bool) {
	h := r.Header.Get("Proxy-Authorization")
	if h == "" {
		return "", "", false
	}
	req := &http.Request{Header: http.Header{"Authorization": {h}}}
	return req.BasicAuth()
}
