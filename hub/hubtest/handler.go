package hubtest

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
)

// handler adapts Hub to mqttsrv.Handler without putting the callbacks in Hub's API.
type handler struct{ h *Hub }

// session is a connection's Value: the device it authenticated as.
type session struct {
	dev *device
}

func (hd handler) Connect(c *mqttsrv.Conn) (byte, bool) {
	h := hd.h
	h.mu.Lock()
	defer h.mu.Unlock()
	d, present, err := h.connect(c)
	if err != nil {
		var r *refusal
		errors.As(err, &r)
		h.stats.Refused++
		if len(h.refusals) == maxRefusals {
			h.refusals = append(h.refusals[:0], h.refusals[1:]...)
		}
		h.refusals = append(h.refusals, Refusal{ClientID: c.ClientID, Username: c.Username,
			ReturnCode: r.code, Reason: r.Error(), Time: h.now()})
		h.broadcast()
		return r.code, false
	}
	h.stats.Connections++
	h.kick(d) // one connection per device: the newer wins (Azure error 400027)
	d.conn = c
	c.Value = &session{dev: d}
	h.broadcast()
	return packets.Accepted, present
}

// Connected redelivers what a resumed session has queued, now that the CONNACK is out.
func (hd handler) Connected(c *mqttsrv.Conn) {
	if s, ok := c.Value.(*session); ok {
		hd.h.deliverC2D(s.dev)
	}
}

// maxRefusals bounds the refusals a hub remembers; the oldest is dropped.
const maxRefusals = 100

// Refusal is a CONNECT the hub refused, with the reason Azure would not tell the device.
type Refusal struct {
	ClientID   string    `json:"client_id"`
	Username   string    `json:"username"`
	ReturnCode byte      `json:"return_code"`
	Reason     string    `json:"reason"`
	Time       time.Time `json:"time"`
}

// Refusals returns the most recent refused CONNECTs, oldest first.
func (h *Hub) Refusals() []Refusal {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.refusals)
}

// refusal is a refused CONNECT's return code and reason.
type refusal struct {
	code byte
	err  error
}

func (r *refusal) Error() string { return r.err.Error() }

func refuse(code byte, format string, a ...any) error {
	return &refusal{code: code, err: fmt.Errorf(format, a...)}
}

// connect authenticates a CONNECT and returns the device with whether its session was
// resumed, or a *refusal. h.mu is held.
func (h *Hub) connect(c *mqttsrv.Conn) (*device, bool, error) {
	if err := h.injectedConnectFailure(); err != nil {
		return nil, false, err
	}
	id, err := parseUsername(c.Username)
	if err != nil {
		return nil, false, refuse(packets.ErrRefusedBadUsernameOrPassword, "%w", err)
	}
	if !h.isName(id.host) {
		return nil, false, refuse(packets.ErrRefusedBadUsernameOrPassword, "username names hub %q, this is %q", id.host, h.Name())
	}
	clientID := id.deviceID
	if id.moduleID != "" {
		clientID += "/" + id.moduleID
	}
	if clientID != c.ClientID {
		return nil, false, refuse(packets.ErrRefusedBadUsernameOrPassword, "client ID %q does not match the username's %q", c.ClientID, clientID)
	}
	if id.moduleID != "" {
		return nil, false, refuse(packets.ErrRefusedNotAuthorised, "module identities are not emulated")
	}
	d, ok := h.devices[id.deviceID]
	switch {
	case !ok:
		return nil, false, refuse(packets.ErrRefusedNotAuthorised, "device %q is not registered on this hub", id.deviceID)
	case d.Disabled:
		return nil, false, refuse(packets.ErrRefusedNotAuthorised, "device %q is disabled", id.deviceID)
	}
	hasX509 := len(d.CAs) > 0 || len(d.Thumbprints) > 0 || len(d.Issued) > 0
	var peer []*x509.Certificate
	if c.TLS != nil {
		peer = c.TLS.PeerCertificates
	}
	switch {
	case hasX509 && len(peer) > 0:
		err = d.authenticateX509(peer, h.now())
	case len(d.SymmetricKeys) > 0 && c.Password != nil:
		var resources []string
		for _, n := range h.names {
			resources = append(resources, sasResource(n, d.ID))
		}
		err = checkSAS(string(c.Password), resources, d.SymmetricKeys, h.now())
	case hasX509:
		err = errors.New("no client certificate was presented")
	case len(d.SymmetricKeys) == 0:
		err = errors.New("the device has no credential left: its operational certificates were revoked or expired")
	default:
		err = errors.New("no SAS token was presented")
	}
	if err != nil {
		return nil, false, refuse(packets.ErrRefusedNotAuthorised, "device %q: %w", id.deviceID, err)
	}
	d.clientType, d.modelID, d.apiVersion = id.query["DeviceClientType"], id.query["model-id"], id.query["api-version"]
	// A CleanSession 1 connection discards the session; a CleanSession 0 one resumes the
	// session left by an earlier CleanSession 0 connection, if any.
	present := !c.CleanSession && d.persistent
	d.persistent = !c.CleanSession
	if !present {
		d.subs = map[string]byte{}
	}
	d.lastSeen = h.now()
	if err := h.save(d); err != nil {
		return nil, false, refuse(packets.ErrRefusedServerUnavailable, "cannot save the session of %q: %w", id.deviceID, err)
	}
	return d, present, nil
}

func (hd handler) Subscribe(c *mqttsrv.Conn, filters []string, qos []byte) []byte {
	h, d := hd.h, c.Value.(*session).dev
	granted := make([]byte, len(filters))
	h.mu.Lock()
	for i, f := range filters {
		kind := ""
		switch f {
		case c2dFilter(d.ID):
			kind = subC2D
		case twinResFilter:
			kind = subTwinRes
		case twinDesiredFilter:
			kind = subTwinDesired
		case methodsFilter:
			kind = subMethods
		case credentialsResFilter:
			if h.creds.issuer != nil { // a hub without certificate management refuses it
				kind = subCredentials
			}
		}
		if kind == "" {
			granted[i] = 0x80
			continue
		}
		granted[i] = min(qos[i], 1) // QoS 2 is granted as 1
		d.subs[kind] = granted[i]
	}
	if err := h.save(d); err != nil {
		for i := range granted {
			granted[i] = 0x80 // the session could not be kept: the device subscribes again
		}
	}
	h.broadcast()
	h.mu.Unlock()
	// The SUBACK is written after this returns; delivery waits its turn on the same
	// connection's writer, so a queued message never precedes the SUBACK by much, and
	// clients accept a PUBLISH for a pending subscription.
	h.after(0, c, func() { h.deliverC2D(d) })
	return granted
}

func (hd handler) Publish(c *mqttsrv.Conn, m mqttsrv.Message) error {
	h, d := hd.h, c.Value.(*session).dev
	if m.QoS > 1 {
		return h.violation(fmt.Errorf("QoS %d publish to %q", m.QoS, m.Topic))
	}
	h.mu.Lock()
	d.lastSeen = h.now()
	h.mu.Unlock()
	switch t := m.Topic; {
	case t == eventsPrefix(d.ID) || strings.HasPrefix(t, eventsPrefix(d.ID)+"/"):
		return h.receiveTelemetry(d, m)
	case strings.HasPrefix(t, twinGetPrefix):
		return h.twinGet(c, d, t)
	case strings.HasPrefix(t, twinPatchPrefix):
		return h.twinPatch(c, d, t, m.Payload)
	case strings.HasPrefix(t, methodResPrefix):
		return h.methodResponse(d, t, m.Payload)
	case strings.HasPrefix(t, issueCertificateTopic):
		return h.issueCertificate(c, d, t, m.Payload)
	}
	return h.violation(fmt.Errorf("publish to unsupported topic %q", m.Topic))
}

func (hd handler) Disconnected(c *mqttsrv.Conn, _ error) {
	h, d := hd.h, c.Value.(*session).dev
	h.mu.Lock()
	defer h.mu.Unlock()
	if d.conn == c {
		d.conn = nil
	}
	h.broadcast()
}

// violation counts a connection the hub closes for protocol misuse, as IoT Hub answers
// misuse over MQTT (protocol.md §5.8).
func (h *Hub) violation(err error) error {
	h.mu.Lock()
	h.stats.Violations++
	h.broadcast()
	h.mu.Unlock()
	return fmt.Errorf("hubtest: %w", err)
}

// respond publishes a response to the device if it has subscribed to the response topic;
// IoT Hub does not deliver to topics a device has not subscribed to.
func (h *Hub) respond(c *mqttsrv.Conn, d *device, kind, topic string, payload []byte) {
	h.mu.Lock()
	qos, ok := d.subs[kind]
	h.mu.Unlock()
	if !ok {
		return
	}
	c.Publish(mqttsrv.Message{Topic: topic, QoS: qos, Payload: payload})
}

func twinResponseTopic(status int, rid string, version int) string {
	t := twinResPrefix + strconv.Itoa(status) + "/?$rid=" + rid
	if version > 0 {
		t += "&$version=" + strconv.Itoa(version)
	}
	return t
}
