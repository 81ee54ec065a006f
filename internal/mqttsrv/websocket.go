package mqttsrv

import (
	"io"
	"net/http"
	"time"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{
	Subprotocols: []string{"mqtt"},
	// Devices send no Origin; browsers are not clients of these services.
	CheckOrigin: func(*http.Request) bool { return true },
}

// wsConn presents a WebSocket as the byte stream MQTT expects: binary messages are read as
// one continuous stream and each write is one message.
type wsConn struct {
	*websocket.Conn
	r io.Reader
}

func newWSConn(ws *websocket.Conn) *wsConn { return &wsConn{Conn: ws} }

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			_, r, err := c.NextReader()
			if err != nil {
				return 0, err
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}
