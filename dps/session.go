package dps

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

const (
	subscribeFilter = "$dps/registrations/res/#"
	registerTopic   = "$dps/registrations/PUT/iotdps-register/?$rid="
	pollTopic       = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="
	keepAlive       = 60 * time.Second
	// disconnectGrace lets a DISCONNECT packet go out before the socket closes.
	disconnectGrace = 100 // ms
)

// session is one MQTT connection to DPS. The connection is dialled by connect rather than by
// paho so that ctx can abort every step of it.
type session struct {
	r      *registration
	conn   net.Conn
	client mqtt.Client
	// connecting is the CONNECT's token; paho's connect goroutine has ended once it is done.
	connecting mqtt.Token
	inbox      chan inbound

	lostOnce sync.Once
	lost     chan struct{}
	lostErr  error
}

type inbound struct {
	topic   string
	payload []byte
}

// mqttSession runs MQTT over conn, which dial opened: CONNECT and SUBSCRIBE.
func (r *registration) mqttSession(ctx context.Context, conn net.Conn, transport string) (*session, error) {
	s := &session{r: r, conn: conn, inbox: make(chan inbound, 16), lost: make(chan struct{})}
	password, err := r.sasToken(ctx)
	if err != nil {
		conn.Close()
		return nil, err
	}

	opened := false
	opts := mqtt.NewClientOptions().
		AddBroker((&url.URL{Scheme: "tls", Host: r.req.Endpoint}).String()). // dialled already; see below
		SetCustomOpenConnectionFn(func(*url.URL, mqtt.ClientOptions) (net.Conn, error) {
			if opened {
				return nil, errors.New("connection already used")
			}
			opened = true
			return conn, nil
		}).
		SetProtocolVersion(4). // else paho retries a refused CONNECT as MQTT 3.1 on a used connection
		SetClientID(r.regID).
		SetUsername(r.username).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(keepAlive).
		SetConnectTimeout(r.replyTimeout).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { s.drop(err) })
	if password != "" {
		opts.SetPassword(password)
	}
	s.client = mqtt.NewClient(opts)

	s.connecting = s.client.Connect()
	if err := s.await(ctx, s.connecting, "CONNACK"); err != nil {
		s.close()
		return nil, err
	}
	if code := refusedCONNACK(s.connecting); code != 0 {
		s.close()
		return nil, r.connackError(code)
	}
	r.progress(Progress{Message: "connected to DPS over " + transport})

	sub := s.client.Subscribe(subscribeFilter, 1, func(_ mqtt.Client, m mqtt.Message) {
		select {
		case s.inbox <- inbound{m.Topic(), m.Payload()}:
		default: // a flood of stray replies; ours is re-requested on timeout
		}
	})
	if err := s.await(ctx, sub, "SUBACK"); err != nil {
		s.close()
		return nil, err
	}
	if st, ok := sub.(*mqtt.SubscribeToken); ok && st.Result()[subscribeFilter] == 0x80 {
		s.close()
		return nil, &Error{Message: "DPS refused the subscription to " + subscribeFilter, temporary: true}
	}
	return s, nil
}

// refusedCONNACK is the return code of a CONNACK that refused us, or 0. paho also puts its
// own codes for network errors there, which are not refusals.
func refusedCONNACK(tok mqtt.Token) byte {
	ct, ok := tok.(*mqtt.ConnectToken)
	if !ok || ct.ReturnCode() > 5 {
		return 0
	}
	return ct.ReturnCode()
}

// connackError explains a refused CONNECT (MQTT 3.1.1 return codes).
func (r *registration) connackError(code byte) *Error {
	switch code {
	case 3:
		return &Error{Message: "DPS is unavailable (CONNACK 3: server unavailable)", temporary: true}
	case 4, 5:
		return refused("DPS refused the connection (CONNACK %d): %s", code, r.authFailure())
	case 2:
		return refused("DPS rejected the client ID (CONNACK 2): registration ID %s is not valid", quote(r.regID))
	default:
		return refused("DPS refused the connection (CONNACK %d)", code)
	}
}

func (s *session) drop(err error) {
	s.lostOnce.Do(func() {
		s.lostErr = err
		close(s.lost)
	})
}

// await waits for an acknowledgement within the reply timeout.
func (s *session) await(ctx context.Context, tok mqtt.Token, what string) error {
	timer := time.NewTimer(s.r.replyTimeout)
	defer timer.Stop()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			if refusedCONNACK(tok) != 0 {
				return nil // the caller explains the return code
			}
			return unreachable("the connection to DPS failed while waiting for "+what, err)
		}
		return nil
	case <-s.lost:
		return unreachable("the connection to DPS dropped while waiting for "+what, s.lostErr)
	case <-timer.C:
		return &Error{Message: fmt.Sprintf("DPS did not answer with %s within %s", what, seconds(s.r.replyTimeout)), temporary: true}
	case <-ctx.Done():
		return ctx.Err()
	}
}

// request publishes a register (or, with an operation ID, a poll) and returns the reply
// with the same $rid. Replies for other $rids are not ours and are skipped.
func (s *session) request(ctx context.Context, operationID string) (*reply, error) {
	rid := rand.Text()
	topic, body := registerTopic+rid, s.r.body
	if operationID != "" {
		topic, body = pollTopic+rid+"&operationId="+url.QueryEscape(operationID), nil
	}
	timer := time.NewTimer(s.r.replyTimeout)
	defer timer.Stop()
	pub := s.client.Publish(topic, 1, false, body)
	published := pub.Done()
	for {
		select {
		case m := <-s.inbox:
			if rep, err := match(m, rid); rep != nil || err != nil {
				return rep, err
			}
		case <-published:
			published = nil
			if err := pub.Error(); err != nil {
				// DPS may have replied and then closed without a PUBACK.
				if rep, err := s.drain(rid); rep != nil || err != nil {
					return rep, err
				}
				return nil, unreachable("the connection to DPS dropped before DPS acknowledged the request", err)
			}
		case <-s.lost:
			// DPS may have replied just before the connection went.
			if rep, err := s.drain(rid); rep != nil || err != nil {
				return rep, err
			}
			return nil, unreachable("the connection to DPS dropped while waiting for its reply", s.lostErr)
		case <-timer.C:
			return nil, &Error{Message: fmt.Sprintf("DPS did not reply within %s", seconds(s.r.replyTimeout)), temporary: true}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// drain looks through the messages already received for the reply to rid.
func (s *session) drain(rid string) (*reply, error) {
	for {
		select {
		case m := <-s.inbox:
			if rep, err := match(m, rid); rep != nil || err != nil {
				return rep, err
			}
		default:
			return nil, nil
		}
	}
}

// match parses a message and returns it if it is the reply to rid; nil, nil if it is not.
func match(m inbound, rid string) (*reply, error) {
	rep, err := parseReply(m.topic, m.payload)
	if rep == nil || rep.rid != rid {
		return nil, nil
	}
	return usable(rep, err)
}

// close ends the session, politely if it is up, and waits until paho has let go.
func (s *session) close() {
	if s.client.IsConnectionOpen() {
		s.client.Disconnect(disconnectGrace)
	}
	s.conn.Close() // also unblocks a CONNECT still in flight
	<-s.connecting.Done()
}
