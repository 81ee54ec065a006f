package hubtest

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/mqttsrv"
	"github.com/unicity-iot/unicity/internal/uuid"
)

// MaxRecorded bounds the telemetry a long-running hub keeps; the oldest is dropped.
const MaxRecorded = 10000

// Telemetry is one device-to-cloud message as the hub received it.
type Telemetry struct {
	DeviceID string
	Payload  []byte
	// Properties are the application properties of the topic's property bag, decoded.
	Properties map[string]string
	// System are the "$."-prefixed system properties ("$.ct", "$.mid", …), decoded.
	System   map[string]string
	QoS      byte
	Received time.Time
}

func (h *Hub) receiveTelemetry(d *device, m mqttsrv.Message) error {
	if len(m.Payload) > MaxTelemetrySize {
		return h.violation(fmt.Errorf("telemetry of %d bytes exceeds %d", len(m.Payload), MaxTelemetrySize))
	}
	app, sys := parseProperties(strings.TrimPrefix(m.Topic, eventsPrefix(d.ID)))
	if m.Retain {
		app["mqtt-retain"] = "true" // IoT Hub does not retain; it marks the message instead
	}
	t := Telemetry{DeviceID: d.ID, Payload: m.Payload, Properties: app, System: sys, QoS: m.QoS, Received: h.now()}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.journal != nil {
		if err := h.journal.SaveTelemetry(h.Name(), t); err != nil {
			// No PUBACK: the device sends the message again.
			return fmt.Errorf("hubtest: cannot save telemetry from %q: %w", d.ID, err)
		}
	}
	if len(h.telemetry) == MaxRecorded {
		h.telemetry = append(h.telemetry[:0], h.telemetry[1:]...)
	}
	h.telemetry = append(h.telemetry, t)
	h.stats.Telemetry++
	h.broadcast()
	return nil
}

// Telemetry returns the messages received from a device ("" for every device), oldest first.
func (h *Hub) Telemetry(deviceID string) []Telemetry {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Telemetry
	for _, t := range h.telemetry {
		if deviceID == "" || t.DeviceID == deviceID {
			out = append(out, t)
		}
	}
	return out
}

// WaitTelemetry waits until at least n messages from the device ("" for any) have arrived
// and returns all of them.
func (h *Hub) WaitTelemetry(ctx context.Context, deviceID string, n int) ([]Telemetry, error) {
	var got []Telemetry
	err := h.Await(ctx, func() bool {
		got = h.Telemetry(deviceID)
		return len(got) >= n
	})
	if err != nil {
		return got, fmt.Errorf("%d of %d messages from %q: %w", len(got), n, deviceID, err)
	}
	return got, nil
}

// C2DMessage is a cloud-to-device message waiting for the device's PUBACK.
type C2DMessage struct {
	ID      string
	Payload []byte
	// Properties go in the delivered topic's property bag; "$."-prefixed names are system
	// properties. The hub adds $.mid and $.to.
	Properties map[string]string
}

type c2dMessage struct {
	C2DMessage
	inflight *mqttsrv.Conn // the connection it was last sent on, until acked or closed
}

// SendC2D queues a message for the device and delivers it at once if the device is
// connected and subscribed. It returns the message ID: props["$.mid"] when set, else a new
// GUID.
func (h *Hub) SendC2D(deviceID string, payload []byte, props map[string]string) (string, error) {
	if len(payload) > MaxC2DSize {
		return "", fmt.Errorf("hubtest: message of %d bytes exceeds %d", len(payload), MaxC2DSize)
	}
	h.mu.Lock()
	d, err := h.lookup(deviceID)
	if err != nil {
		h.mu.Unlock()
		return "", err
	}
	if len(d.c2d) >= MaxC2DPending {
		h.mu.Unlock()
		return "", fmt.Errorf("%w: %d messages pending for %q", ErrQueueFull, len(d.c2d), deviceID)
	}
	// The sender may choose the message ID, as with the service SDKs; else it is a GUID, as
	// those SDKs make.
	id := props["$.mid"]
	if id == "" {
		id = uuid.New()
	}
	m := &c2dMessage{C2DMessage: C2DMessage{ID: id, Payload: payload, Properties: maps.Clone(props)}}
	d.c2d = append(d.c2d, m)
	if err := h.save(d); err != nil {
		d.c2d = d.c2d[:len(d.c2d)-1]
		h.mu.Unlock()
		return "", err
	}
	h.stats.C2DSent++
	h.broadcast()
	h.mu.Unlock()
	h.deliverC2D(d)
	return m.ID, nil
}

// PendingC2D returns the messages queued for a device and not yet acknowledged.
func (h *Hub) PendingC2D(deviceID string) ([]C2DMessage, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(deviceID)
	if err != nil {
		return nil, err
	}
	out := make([]C2DMessage, len(d.c2d))
	for i, m := range d.c2d {
		out[i] = m.C2DMessage
	}
	return out, nil
}

// deliverC2D sends every queued message not already in flight, if the device is connected
// and subscribed. A message is completed by the PUBACK; if the connection ends first it is
// sent again on the next one.
func (h *Hub) deliverC2D(d *device) {
	h.mu.Lock()
	conn := d.conn
	qos, subscribed := d.subs[subC2D]
	if conn == nil || !subscribed {
		h.mu.Unlock()
		return
	}
	var batch []*c2dMessage
	for _, m := range d.c2d {
		if m.inflight == nil {
			m.inflight = conn
			batch = append(batch, m)
		}
	}
	h.mu.Unlock()

	for i, m := range batch {
		props := maps.Clone(m.Properties)
		if props == nil {
			props = map[string]string{}
		}
		props["$.mid"] = m.ID
		props["$.to"] = "/devices/" + d.ID + "/messages/deviceBound"
		acked, err := conn.Publish(mqttsrv.Message{Topic: c2dPrefix(d.ID) + hub.EncodeProperties(props), QoS: qos, Payload: m.Payload})
		if err != nil {
			h.mu.Lock()
			for _, m := range batch[i:] {
				if m.inflight == conn {
					m.inflight = nil
				}
			}
			h.mu.Unlock()
			return
		}
		h.wg.Add(1)
		go h.awaitAck(d, m, conn, acked)
	}
}

func (h *Hub) awaitAck(d *device, m *c2dMessage, conn *mqttsrv.Conn, acked <-chan struct{}) {
	defer h.wg.Done()
	select {
	case <-acked:
		h.mu.Lock()
		for i, q := range d.c2d {
			if q == m {
				d.c2d = append(d.c2d[:i], d.c2d[i+1:]...)
				break
			}
		}
		h.stats.C2DCompleted++
		// Should the save fail, a restart delivers the message again: at least once, as
		// IoT Hub promises.
		h.save(d)
		h.broadcast()
		h.mu.Unlock()
	case <-conn.Done():
		h.mu.Lock()
		if m.inflight == conn {
			m.inflight = nil
		}
		h.mu.Unlock()
		h.deliverC2D(d) // a newer connection may already be waiting for it
	}
}

// MethodResult is a device's answer to a direct method.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// Invoke calls a direct method on a connected device and waits for its answer until ctx
// ends (the service's responseTimeoutInSeconds). A device that is offline or has not
// subscribed to methods gives ErrDeviceNotOnline; no answer in time gives ErrTimeout.
func (h *Hub) Invoke(ctx context.Context, deviceID, method string, payload []byte) (MethodResult, error) {
	if len(payload) > MaxMethodPayload {
		return MethodResult{}, fmt.Errorf("hubtest: method payload of %d bytes exceeds %d", len(payload), MaxMethodPayload)
	}
	if len(payload) > 0 && !json.Valid(payload) {
		return MethodResult{}, fmt.Errorf("hubtest: method payload is not JSON")
	}
	if method == "" || strings.ContainsAny(method, "/?#+") {
		return MethodResult{}, fmt.Errorf("hubtest: invalid method name %q", method)
	}
	h.mu.Lock()
	d, err := h.lookup(deviceID)
	if err != nil {
		h.mu.Unlock()
		return MethodResult{}, err
	}
	conn := d.conn
	if _, subscribed := d.subs[subMethods]; conn == nil || !subscribed {
		h.mu.Unlock()
		return MethodResult{}, fmt.Errorf("%w: %q", ErrDeviceNotOnline, deviceID)
	}
	rid := uuid.New() // a GUID, as IoT Hub's
	answer := make(chan MethodResult, 1)
	d.methods[rid] = answer
	h.stats.Methods++
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(d.methods, rid)
		h.mu.Unlock()
	}()

	topic := methodPostPrefix + method + "/?$rid=" + rid
	if _, err := conn.Publish(mqttsrv.Message{Topic: topic, Payload: payload}); err != nil {
		return MethodResult{}, fmt.Errorf("%w: %q: %w", ErrDeviceNotOnline, deviceID, err)
	}
	select {
	case r := <-answer:
		return r, nil
	case <-conn.Done():
		return MethodResult{}, fmt.Errorf("%w: %q disconnected before answering", ErrDeviceNotOnline, deviceID)
	case <-ctx.Done():
		return MethodResult{}, fmt.Errorf("%w: method %q on %q: %w", ErrTimeout, method, deviceID, ctx.Err())
	}
}

// methodResponse takes "$iothub/methods/res/{status}/?$rid={rid}". Answers to unknown or
// timed-out requests are dropped, as the service does.
func (h *Hub) methodResponse(d *device, topic string, payload []byte) error {
	status, query, ok := strings.Cut(strings.TrimPrefix(topic, methodResPrefix), "/?")
	code, err := strconv.Atoi(status)
	rid := parseQuery(query)["$rid"]
	if !ok || err != nil || rid == "" {
		return h.violation(fmt.Errorf("malformed method response topic %q", topic))
	}
	if len(payload) > MaxMethodPayload {
		return h.violation(fmt.Errorf("method response of %d bytes exceeds %d", len(payload), MaxMethodPayload))
	}
	h.mu.Lock()
	answer := d.methods[rid]
	h.mu.Unlock()
	if answer != nil {
		select {
		case answer <- MethodResult{Status: code, Payload: payload}:
		default: // answered twice; the first answer counts
		}
	}
	return nil
}
