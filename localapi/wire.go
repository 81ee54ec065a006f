package localapi

import (
	"encoding/json"
	"errors"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/storage"
)

// Assignment is the JSON form of a stored assignment in API replies and `--json` output.
type Assignment struct {
	RegistrationID string    `json:"registration_id"`
	AssignedHub    string    `json:"assigned_hub"`
	DeviceID       string    `json:"device_id"`
	Substatus      string    `json:"substatus"`
	Transport      string    `json:"transport,omitempty"`
	ProvisionedAt  time.Time `json:"provisioned_at"`
}

// AssignmentOf is st as shown to users.
func AssignmentOf(st *storage.State) Assignment {
	return Assignment{
		RegistrationID: st.RegistrationID,
		AssignedHub:    st.AssignedHub,
		DeviceID:       st.DeviceID,
		Substatus:      st.Substatus,
		Transport:      st.Transport,
		ProvisionedAt:  st.ProvisionedAt,
	}
}

// progressLine is one line of the reprovision reply: status updates while the agent works,
// then the result or the error.
type progressLine struct {
	Status     *device.Status `json:"status,omitempty"`
	Assignment *Assignment    `json:"assignment,omitempty"`
	Error      string         `json:"error,omitempty"`
	Kind       string         `json:"kind,omitempty"`
}

// TelemetryRequest is the body of POST /v1/telemetry. The payload is either a JSON value,
// sent as its JSON text, or arbitrary bytes in base64; Properties holds application
// properties and, under their "$." names ("$.ct", "$.ce", "$.mid", …), system properties.
type TelemetryRequest struct {
	Payload       json.RawMessage   `json:"payload,omitempty"`
	PayloadBase64 []byte            `json:"payload_base64,omitempty"`
	Properties    map[string]string `json:"properties,omitempty"`
}

// Event is one line of the GET /v1/events stream.
type Event struct {
	// Type is "subscribed" (first line), "c2d", "desired" or "method".
	Type string `json:"type"`
	// c2d: the message; Payload is set too when the bytes are JSON.
	PayloadBase64 []byte            `json:"payload_base64,omitempty"`
	Properties    map[string]string `json:"properties,omitempty"`
	// desired: the patch, or with Full the whole desired section (after a reconnect).
	Version int64           `json:"version,omitempty"`
	Full    bool            `json:"full,omitempty"`
	Desired json.RawMessage `json:"desired,omitempty"`
	// method: answer with POST /v1/methods/{ID}/response.
	ID      string          `json:"id,omitempty"`
	Name    string          `json:"name,omitempty"`
	Payload json.RawMessage `json:"payload,omitempty"`
	// subscribed: the methods this stream serves.
	Methods []string `json:"methods,omitempty"`
}

// MethodAnswer is the body of POST /v1/methods/{id}/response.
type MethodAnswer struct {
	Status  *int            `json:"status"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// RegistrationStatus is the status, in HTTP's terms, of a failed registration: the local
// API's answer, and the unicity.reprovision method's.
func RegistrationStatus(err error) int {
	switch {
	case errors.Is(err, device.ErrRateLimited):
		return 429
	case errors.Is(err, device.ErrRefused):
		return 403
	case errors.Is(err, device.ErrUnreachable), errors.Is(err, device.ErrTemporary):
		return 503
	}
	return 500
}

// Error kinds on the wire, so that the CLI keeps its exit codes across the socket.
var kinds = []struct {
	name string
	err  error
}{
	{"refused", device.ErrRefused},
	{"unreachable", device.ErrUnreachable},
	{"temporary", device.ErrTemporary},
	{"identity", device.ErrIdentity},
}

func kindOf(err error) string {
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			return k.name
		}
	}
	return "failure"
}

func errorOfKind(msg, kind string) error {
	err := errors.New(msg)
	for _, k := range kinds {
		if k.name == kind {
			return device.Mark(err, k.err)
		}
	}
	return err
}
