package hubtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
)

// maxTwinDepth is IoT Hub's nesting limit for twin properties.
const maxTwinDepth = 10

// Twin is a device twin's properties. Numbers are json.Number so that values round-trip
// exactly; MarshalJSON gives the document a twin GET returns.
type Twin struct {
	Desired         map[string]any
	Reported        map[string]any
	DesiredVersion  int
	ReportedVersion int
}

// MarshalJSON renders the twin as IoT Hub's GET response: each section carries its $version.
func (t Twin) MarshalJSON() ([]byte, error) {
	section := func(props map[string]any, version int) map[string]any {
		m := make(map[string]any, len(props)+1)
		for k, v := range props {
			m[k] = v
		}
		m["$version"] = version
		return m
	}
	return json.Marshal(map[string]any{
		"desired":  section(t.Desired, t.DesiredVersion),
		"reported": section(t.Reported, t.ReportedVersion),
	})
}

type twin struct {
	desired, reported               map[string]any
	desiredVersion, reportedVersion int
}

// newTwin starts both sections at version 1, as IoT Hub does for a new device.
func newTwin(desired map[string]any) twin {
	if desired == nil {
		desired = map[string]any{}
	}
	return twin{desired: desired, reported: map[string]any{}, desiredVersion: 1, reportedVersion: 1}
}

func (t twin) clone() twin {
	return twin{desired: deepCopy(t.desired), reported: deepCopy(t.reported),
		desiredVersion: t.desiredVersion, reportedVersion: t.reportedVersion}
}

func (t twin) export() Twin {
	return Twin{Desired: deepCopy(t.desired), Reported: deepCopy(t.reported),
		DesiredVersion: t.desiredVersion, ReportedVersion: t.reportedVersion}
}

func deepCopy(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = deepCopyValue(v)
	}
	return out
}

func deepCopyValue(v any) any {
	switch v := v.(type) {
	case map[string]any:
		return deepCopy(v)
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = deepCopyValue(e)
		}
		return out
	}
	return v // strings, json.Number, bools: immutable
}

// unmarshalObject decodes one JSON object (numbers as json.Number) and nothing after it.
func unmarshalObject(data []byte, v *map[string]any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("data after the JSON object")
	}
	if *v == nil {
		return errors.New("not a JSON object")
	}
	return nil
}

// parsePatch decodes a twin patch and checks IoT Hub's rules for property names (no '.',
// '$', space or control characters) and nesting depth.
func parsePatch(data []byte) (map[string]any, error) {
	var patch map[string]any
	if err := unmarshalObject(data, &patch); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadTwinPatch, err)
	}
	if err := checkNames(patch, 1); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadTwinPatch, err)
	}
	return patch, nil
}

func checkNames(m map[string]any, depth int) error {
	if depth > maxTwinDepth {
		return fmt.Errorf("nested deeper than %d levels", maxTwinDepth)
	}
	for k, v := range m {
		if k == "" || strings.ContainsAny(k, ".$ ") || strings.ContainsFunc(k, func(r rune) bool { return r < 0x20 || (r >= 0x7f && r < 0xa0) }) {
			return fmt.Errorf("property name %q is not allowed", k)
		}
		if sub, ok := v.(map[string]any); ok {
			if err := checkNames(sub, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// mergePatch applies a JSON merge patch: null deletes, objects merge, anything else replaces.
func mergePatch(dst, patch map[string]any) {
	for k, v := range patch {
		switch v := v.(type) {
		case nil:
			delete(dst, k)
		case map[string]any:
			cur, ok := dst[k].(map[string]any)
			if !ok {
				cur = map[string]any{}
				dst[k] = cur
			}
			mergePatch(cur, v)
		default:
			dst[k] = v
		}
	}
}

// Twin returns a copy of the device's twin.
func (h *Hub) Twin(id string) (Twin, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(id)
	if err != nil {
		return Twin{}, err
	}
	return d.twin.export(), nil
}

// WaitReported waits until the device's reported properties reach at least version.
func (h *Hub) WaitReported(ctx context.Context, id string, version int) (Twin, error) {
	var tw Twin
	err := h.Await(ctx, func() bool {
		var err error
		tw, err = h.Twin(id)
		return err == nil && tw.ReportedVersion >= version
	})
	return tw, err
}

// PatchDesired merges patch into the desired properties and notifies the device if it is
// connected and subscribed (IoT Hub does not queue these notifications). It returns the new
// desired version.
func (h *Hub) PatchDesired(id string, patch []byte) (int, error) {
	p, err := parsePatch(patch)
	if err != nil {
		return 0, err
	}
	h.mu.Lock()
	d, err := h.lookup(id)
	if err != nil {
		h.mu.Unlock()
		return 0, err
	}
	mergePatch(d.twin.desired, p)
	d.twin.desiredVersion++
	version := d.twin.desiredVersion
	conn := d.conn
	qos, subscribed := d.subs[subTwinDesired]
	h.broadcast()
	err = h.save(d)
	h.mu.Unlock()
	if err != nil {
		return 0, err
	}

	if conn != nil && subscribed {
		p["$version"] = version
		body, err := json.Marshal(p)
		if err != nil {
			return version, err
		}
		conn.Publish(mqttsrv.Message{Topic: desiredPatchTopic + strconv.Itoa(version), QoS: qos, Payload: body})
	}
	return version, nil
}

func (h *Hub) twinGet(c *mqttsrv.Conn, d *device, topic string) error {
	rid, ok := requestID(topic)
	if !ok {
		return h.violation(fmt.Errorf("twin GET without $rid: %q", topic))
	}
	if status, body := h.injectedTwinFailure(); status != 0 {
		h.respond(c, d, subTwinRes, twinResponseTopic(status, rid, 0), body)
		return nil
	}
	h.mu.Lock()
	body, err := json.Marshal(d.twin.export())
	h.mu.Unlock()
	if err != nil {
		return err
	}
	h.respond(c, d, subTwinRes, twinResponseTopic(200, rid, 0), body)
	return nil
}

func (h *Hub) twinPatch(c *mqttsrv.Conn, d *device, topic string, payload []byte) error {
	rid, ok := requestID(topic)
	if !ok {
		return h.violation(fmt.Errorf("twin PATCH without $rid: %q", topic))
	}
	if status, body := h.injectedTwinFailure(); status != 0 {
		h.respond(c, d, subTwinRes, twinResponseTopic(status, rid, 0), body)
		return nil
	}
	patch, err := parsePatch(payload)
	if err != nil {
		body, _ := json.Marshal(map[string]any{"errorCode": 400004, "message": err.Error()})
		h.respond(c, d, subTwinRes, twinResponseTopic(400, rid, 0), body)
		return nil
	}
	h.mu.Lock()
	mergePatch(d.twin.reported, patch)
	d.twin.reportedVersion++
	version := d.twin.reportedVersion
	h.broadcast()
	err = h.save(d)
	h.mu.Unlock()
	if err != nil {
		body, _ := json.Marshal(map[string]any{"errorCode": 500001, "message": "cannot save the twin: " + err.Error()})
		h.respond(c, d, subTwinRes, twinResponseTopic(500, rid, 0), body)
		return nil
	}
	h.respond(c, d, subTwinRes, twinResponseTopic(204, rid, version), nil)
	return nil
}
