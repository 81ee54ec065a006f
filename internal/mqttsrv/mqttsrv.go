// Package mqttsrv accepts MQTT 3.1.1 connections over TLS and WebSocket and hands each one's
// packets to a Handler. One TLS port serves both: a connection that opens with an HTTP
// request is upgraded to a WebSocket (or given to the service's own HTTP handler, for a REST
// API beside MQTT), anything else is read as MQTT. It is the framing, keep-alive and acknowledgement layer under the DPS
// and IoT Hub emulators, which are request/response services and not brokers: nothing is
// routed between connections here, a handler answers the connection that asked.
// Packets are encoded and decoded by paho's codec; this package only frames and bounds them.
package mqttsrv

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

// Handler decides what a service does with a connection. Calls for one connection are made
// from that connection's goroutine, one at a time; different connections run concurrently.
type Handler interface {
	// Connect is called once after CONNECT; code 0 accepts, anything else is sent in the
	// CONNACK and the connection is closed.
	Connect(c *Conn) (code byte, sessionPresent bool)
	// Subscribe returns the granted QoS for each filter (0x80 refuses it).
	Subscribe(c *Conn, filters []string, qos []byte) []byte
	// Publish receives a client's PUBLISH. A non-nil error closes the connection, which is
	// how IoT Hub answers protocol misuse. QoS 1 publishes are acknowledged after it returns.
	Publish(c *Conn, m Message) error
	// Disconnected is called once after an accepted connection has ended, for any reason;
	// err is nil after a clean DISCONNECT.
	Disconnected(c *Conn, err error)
}

// ConnectedHandler is implemented by handlers that act once the CONNACK is on the wire, such
// as a hub delivering what a resumed session has queued: a message sent from Connect would
// reach the client before the CONNACK. Connected must not wait for the client, whose
// packets are read only after it returns.
type ConnectedHandler interface {
	Connected(c *Conn)
}

// Message is one application message in either direction.
type Message struct {
	Topic   string
	QoS     byte
	Retain  bool
	Payload []byte
}

// ErrClosed is returned by Conn.Publish once the connection has ended.
var ErrClosed = errors.New("mqttsrv: connection closed")

// Defaults for Server fields left zero.
const (
	DefaultMaxPacketSize  = 512 << 10
	DefaultConnectTimeout = 10 * time.Second
	writeTimeout          = 10 * time.Second
	// lingerTimeout bounds how long a closing connection waits for the client's last packets.
	lingerTimeout = 500 * time.Millisecond
)

// Server serves MQTT connections to Handler. Set the fields before the first Serve.
type Server struct {
	Handler   Handler
	TLSConfig *tls.Config // used by Serve; WebSocket connections arrive already decrypted
	// MaxPacketSize bounds a packet's remaining length; a larger one closes the connection
	// before anything is allocated for it.
	MaxPacketSize  int
	ConnectTimeout time.Duration
	// HTTP, if set, serves the HTTP requests that arrive on Serve's port, with Request.TLS
	// set: a service's REST API. It must hand WebSocket upgrades to WebSocket(). nil serves
	// WebSocket() alone.
	HTTP http.Handler

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	http      *http.Server // WebSocket upgrades arriving on Serve's port
	upgrades  *connListener
	closed    bool
	wg        sync.WaitGroup
}

// Serve accepts TCP connections from l, performs the TLS handshake and serves them until
// l is closed or Close is called. It always returns a non-nil error.
func (s *Server) Serve(l net.Listener) error {
	if s.TLSConfig == nil {
		return errors.New("mqttsrv: Serve needs a TLSConfig")
	}
	if !s.track(l) {
		l.Close()
		return ErrClosed
	}
	defer s.untrack(l)
	for {
		raw, err := l.Accept()
		if err != nil {
			return err
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			conn := tls.Server(raw, s.TLSConfig)
			conn.SetDeadline(time.Now().Add(s.connectTimeout()))
			if err := conn.Handshake(); err != nil {
				raw.Close()
				return
			}
			state := conn.ConnectionState()
			pc := &peekedConn{Conn: conn, r: bufio.NewReader(conn), state: &state}
			if first, err := pc.r.Peek(1); err == nil && isHTTPMethod(first[0]) {
				s.serveHTTP(pc)
				return
			}
			s.serve(pc, &state, false)
		}()
	}
}

// WebSocket returns the handler for MQTT over WebSocket. Serve already answers WebSocket
// upgrades on its port; mount this on an HTTPS server only to serve them on another one.
// It answers on "/" and "/$iothub/websocket" (the Azure SDKs use both) with subprotocol "mqtt".
func (s *Server) WebSocket() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" && r.URL.Path != "/$iothub/websocket" {
			http.NotFound(w, r)
			return
		}
		state := r.TLS
		ws, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return // the upgrader has answered the request
		}
		s.wg.Add(1)
		defer s.wg.Done()
		s.serve(newWSConn(ws), state, true)
	})
}

// Close closes every listener and connection and waits for their goroutines to end.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	if s.http != nil {
		s.http.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) track(v any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	switch v := v.(type) {
	case net.Listener:
		if s.listeners == nil {
			s.listeners = make(map[net.Listener]struct{})
		}
		s.listeners[v] = struct{}{}
	case net.Conn:
		if s.conns == nil {
			s.conns = make(map[net.Conn]struct{})
		}
		s.conns[v] = struct{}{}
	}
	return true
}

func (s *Server) untrack(v any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch v := v.(type) {
	case net.Listener:
		delete(s.listeners, v)
	case net.Conn:
		delete(s.conns, v)
	}
}

func (s *Server) connectTimeout() time.Duration {
	if s.ConnectTimeout > 0 {
		return s.ConnectTimeout
	}
	return DefaultConnectTimeout
}

func (s *Server) maxPacketSize() int {
	if s.MaxPacketSize > 0 {
		return s.MaxPacketSize
	}
	return DefaultMaxPacketSize
}

// serve runs one connection from CONNECT to its end.
func (s *Server) serve(nc net.Conn, state *tls.ConnectionState, ws bool) {
	if !s.track(nc) {
		nc.Close()
		return
	}
	defer s.untrack(nc)
	defer closeGracefully(nc)

	c := &Conn{nc: nc, TLS: state, WebSocket: ws, RemoteAddr: nc.RemoteAddr(),
		done: make(chan struct{}), pending: make(map[uint16]chan struct{})}
	r := bufio.NewReader(nc)

	nc.SetReadDeadline(time.Now().Add(s.connectTimeout()))
	first, err := s.readPacket(r)
	if err != nil {
		return
	}
	cp, ok := first.(*packets.ConnectPacket)
	if !ok {
		return // MQTT-3.1.0-1: the first packet must be CONNECT
	}
	if cp.ProtocolName != "MQTT" || cp.ProtocolVersion != 4 {
		c.writeConnack(packets.ErrRefusedBadProtocolVersion, false)
		return
	}
	c.ClientID, c.Username, c.CleanSession = cp.ClientIdentifier, cp.Username, cp.CleanSession
	if cp.PasswordFlag {
		c.Password = cp.Password
	}
	c.KeepAlive = time.Duration(cp.Keepalive) * time.Second

	code, present := s.Handler.Connect(c)
	if err := c.writeConnack(code, present && code == packets.Accepted); err != nil || code != packets.Accepted {
		return
	}
	if ch, ok := s.Handler.(ConnectedHandler); ok {
		ch.Connected(c)
	}
	err = s.loop(c, r)
	c.end()
	s.Handler.Disconnected(c, err)
}

// closeGracefully ends a connection the server is done with so that the client still reads
// what was written last: an answer followed by a scripted drop, a refusing CONNACK. Closing
// a socket with unread input makes the kernel send RST, and a client that gets RST discards
// what it had received but not yet read; so the write side is shut first (TLS close_notify,
// then FIN) and the client's last packets are read away, for a moment at most.
func closeGracefully(nc net.Conn) {
	defer nc.Close()
	cw, ok := nc.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	nc.SetReadDeadline(time.Now().Add(lingerTimeout))
	io.Copy(io.Discard, nc)
}

// loop reads packets until the connection ends; the returned error says why (nil for a
// clean DISCONNECT).
func (s *Server) loop(c *Conn, r *bufio.Reader) error {
	for {
		if c.KeepAlive > 0 {
			// MQTT-3.1.2-24: one and a half keep-alive periods without a packet ends it.
			c.nc.SetReadDeadline(time.Now().Add(c.KeepAlive * 3 / 2))
		} else {
			c.nc.SetReadDeadline(time.Time{})
		}
		p, err := s.readPacket(r)
		if err != nil {
			return err
		}
		switch p := p.(type) {
		case *packets.PublishPacket:
			m := Message{Topic: p.TopicName, QoS: p.Qos, Retain: p.Retain, Payload: p.Payload}
			if err := s.Handler.Publish(c, m); err != nil {
				return err
			}
			if p.Qos == 1 {
				ack := packets.NewControlPacket(packets.Puback).(*packets.PubackPacket)
				ack.MessageID = p.MessageID
				if err := c.write(ack); err != nil {
					return err
				}
			}
		case *packets.PubackPacket:
			c.acked(p.MessageID)
		case *packets.SubscribePacket:
			ack := packets.NewControlPacket(packets.Suback).(*packets.SubackPacket)
			ack.MessageID = p.MessageID
			ack.ReturnCodes = s.Handler.Subscribe(c, p.Topics, p.Qoss)
			if err := c.write(ack); err != nil {
				return err
			}
		case *packets.UnsubscribePacket:
			ack := packets.NewControlPacket(packets.Unsuback).(*packets.UnsubackPacket)
			ack.MessageID = p.MessageID
			if err := c.write(ack); err != nil {
				return err
			}
		case *packets.PingreqPacket:
			if err := c.write(packets.NewControlPacket(packets.Pingresp)); err != nil {
				return err
			}
		case *packets.DisconnectPacket:
			return nil
		default:
			return fmt.Errorf("mqttsrv: unexpected packet %T", p)
		}
	}
}

// readPacket reads one packet, refusing one larger than MaxPacketSize before paho's codec
// allocates a buffer of the announced size.
func (s *Server) readPacket(r *bufio.Reader) (packets.ControlPacket, error) {
	head, err := r.Peek(2)
	if err != nil {
		return nil, err
	}
	length, shift := 0, 0
	for i := 1; ; i++ {
		if i > 4 {
			return nil, errors.New("mqttsrv: malformed remaining length")
		}
		if i >= len(head) {
			if head, err = r.Peek(i + 1); err != nil {
				return nil, err
			}
		}
		length |= int(head[i]&0x7f) << shift
		if head[i]&0x80 == 0 {
			break
		}
		shift += 7
	}
	if length > s.maxPacketSize() {
		return nil, fmt.Errorf("mqttsrv: packet of %d bytes exceeds the limit of %d", length, s.maxPacketSize())
	}
	return packets.ReadPacket(r)
}
