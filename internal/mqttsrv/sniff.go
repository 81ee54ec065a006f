package mqttsrv

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// peekedConn is a TLS connection whose first bytes have been looked at to choose between
// MQTT and HTTP; reads continue from the buffer that holds them.
type peekedConn struct {
	net.Conn
	r     *bufio.Reader
	state *tls.ConnectionState
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// CloseWrite shuts the TLS connection's write side, for closeGracefully.
func (c *peekedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

type tlsStateKey struct{}

// idleTimeout closes a REST client's kept-alive connection it has left idle.
const idleTimeout = time.Minute

// isHTTPMethod tells the first byte of an HTTP request (a method: GET for a WebSocket
// upgrade, PUT and GET for a REST API) from that of MQTT's CONNECT (0x10). The upper-case
// letters are types 4 and 5 (PUBACK, PUBREC), which no client opens with.
func isHTTPMethod(b byte) bool { return 'A' <= b && b <= 'Z' }

// serveHTTP hands a connection that opened with an HTTP request to the server's HTTP/1.1
// server, created on first use, which upgrades it to MQTT over WebSocket or passes it to the
// HTTP handler.
func (s *Server) serveHTTP(c *peekedConn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	if s.http == nil {
		s.upgrades = &connListener{conns: make(chan net.Conn), done: make(chan struct{}), addr: c.LocalAddr()}
		h := s.HTTP
		if h == nil {
			h = s.WebSocket()
		}
		s.http = &http.Server{
			// net/http sets Request.TLS only for a *tls.Conn; carry the handshake's state.
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				r.TLS, _ = r.Context().Value(tlsStateKey{}).(*tls.ConnectionState)
				h.ServeHTTP(w, r)
			}),
			ReadHeaderTimeout: s.connectTimeout(),
			IdleTimeout:       idleTimeout,
			ConnContext: func(ctx context.Context, nc net.Conn) context.Context {
				if pc, ok := nc.(*peekedConn); ok {
					return context.WithValue(ctx, tlsStateKey{}, pc.state)
				}
				return ctx
			},
		}
		srv, l := s.http, s.upgrades
		s.wg.Add(1)
		go func() { defer s.wg.Done(); srv.Serve(l) }()
	}
	l := s.upgrades
	s.mu.Unlock()
	l.hand(c)
}

// connListener is the listener net/http serves: connections arrive from serveHTTP.
type connListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	addr  net.Addr
}

func (l *connListener) hand(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }
