package dial

import (
	"errors"
	"fmt"
	"net"
)

// DefaultMaxPacket bounds an incoming MQTT packet when Config.MaxPacket is zero: above the
// largest thing IoT Hub sends a device (a 128 KiB method payload, twins of 32 KiB sections).
const DefaultMaxPacket = 1 << 20

// ErrPacketTooLarge ends a connection whose peer announced an MQTT packet over the limit.
var ErrPacketTooLarge = errors.New("incoming MQTT packet exceeds the size limit")

// limitedConn fails reads once the peer announces a packet larger than max. paho's codec
// allocates a packet's whole announced length (up to 256 MiB) before reading it, so the
// bound has to be enforced on the byte stream, before paho sees the header.
type limitedConn struct {
	net.Conn
	max       int
	remaining int    // body bytes of the current packet still to come
	header    []byte // the fixed header read so far: type byte, then the length bytes
	err       error
}

func limitPackets(c net.Conn, max int) net.Conn {
	if max <= 0 {
		max = DefaultMaxPacket
	}
	return &limitedConn{Conn: c, max: max, header: make([]byte, 0, 5)}
}

func (c *limitedConn) Read(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.Conn.Read(p)
	if serr := c.scan(p[:n]); serr != nil {
		c.err = serr
		c.Conn.Close()
		return 0, serr
	}
	return n, err
}

// scan follows packet boundaries through b, checking each fixed header as it completes.
func (c *limitedConn) scan(b []byte) error {
	for len(b) > 0 {
		if c.remaining > 0 {
			k := min(c.remaining, len(b))
			c.remaining -= k
			b = b[k:]
			continue
		}
		c.header = append(c.header, b[0])
		b = b[1:]
		if n := len(c.header); n == 1 || c.header[n-1]&0x80 != 0 {
			if n == 5 {
				return fmt.Errorf("%w: malformed remaining length", ErrPacketTooLarge)
			}
			continue
		}
		length, shift := 0, 0
		for _, d := range c.header[1:] {
			length |= int(d&0x7f) << shift
			shift += 7
		}
		if length > c.max {
			return fmt.Errorf("%w: %d bytes announced, %d accepted", ErrPacketTooLarge, length, c.max)
		}
		c.remaining = length
		c.header = c.header[:0]
	}
	return nil
}
