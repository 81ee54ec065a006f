package mqttsrv

import (
	"crypto/tls"
	"net"
	"sync"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
)

// Conn is one accepted client connection. The exported fields are set before
// Handler.Connect and not changed afterwards, except Value, which belongs to the handler.
type Conn struct {
	ClientID     string
	Username     string
	Password     []byte // nil when the CONNECT carried no password
	CleanSession bool
	KeepAlive    time.Duration
	TLS          *tls.ConnectionState // the peer's certificates, for X.509 authentication
	WebSocket    bool
	RemoteAddr   net.Addr
	Value        any // the handler's per-connection state

	nc       net.Conn
	wmu      sync.Mutex // one packet on the wire at a time
	mu       sync.Mutex // guards the fields below
	nextID   uint16
	pending  map[uint16]chan struct{}
	done     chan struct{}
	doneOnce sync.Once
}

// Publish sends m to the client. For QoS 1 the returned channel is closed when the client's
// PUBACK arrives (it stays open if the connection ends first: watch Done); for QoS 0 it is
// closed at once. QoS 2 is not supported by the services this package emulates.
func (c *Conn) Publish(m Message) (acked <-chan struct{}, err error) {
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.TopicName, p.Qos, p.Retain, p.Payload = m.Topic, min(m.QoS, 1), m.Retain, m.Payload
	ch := make(chan struct{})
	if p.Qos == 0 {
		close(ch)
	} else {
		c.mu.Lock()
		select {
		case <-c.done:
			c.mu.Unlock()
			return nil, ErrClosed
		default:
		}
		for {
			c.nextID++
			if _, busy := c.pending[c.nextID]; c.nextID != 0 && !busy {
				break
			}
		}
		p.MessageID = c.nextID
		c.pending[p.MessageID] = ch
		c.mu.Unlock()
	}
	if err := c.write(p); err != nil {
		c.mu.Lock()
		delete(c.pending, p.MessageID)
		c.mu.Unlock()
		return nil, err
	}
	return ch, nil
}

// Done is closed when the connection has ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Close ends the connection from the server side, as a service does when it kicks a
// client; Handler.Disconnected follows.
func (c *Conn) Close() error { return c.nc.Close() }

func (c *Conn) write(p packets.ControlPacket) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	c.nc.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := p.Write(c.nc); err != nil {
		c.nc.Close()
		return err
	}
	return nil
}

func (c *Conn) writeConnack(code byte, sessionPresent bool) error {
	ack := packets.NewControlPacket(packets.Connack).(*packets.ConnackPacket)
	ack.ReturnCode, ack.SessionPresent = code, sessionPresent
	return c.write(ack)
}

func (c *Conn) acked(id uint16) {
	c.mu.Lock()
	ch, ok := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if ok {
		close(ch)
	}
}

func (c *Conn) end() {
	c.doneOnce.Do(func() {
		c.mu.Lock()
		close(c.done)
		c.mu.Unlock()
	})
}
