package mqttsrv

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"sync"
)

// peekedConn is a TLS connection whose first bytes have been looked at to choose between
// MQTT and HTTP; reads continue from the buffer that holds them.
type peekedConn struct {
	net.Conn
	r     *bufio.Reader
	state *tls.ConnectionState
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

type tlsStateKey struct{}

// serveHTTP hands a connection that opened with an HTTP request to the server's HTTP/1.1
// server, created on first use, which upgrades it to MQTT over WebSocket.
func (s *Server) serveHTTP(c *peekedConn) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		return
	}
	if s.http == nil {
		s.upgrades = &connListener{conns: make(chan net.Conn), done: make(chan struct{}), addr: c.LocalAddr()}
		s.http = &http.Server{
			Handler:           s.WebSocket(),
			ReadHeaderTimeout: s.connectTimeout(),
			// net/http sets Request.TLS only for a *tls.Conn; carry the handshake's state.
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
