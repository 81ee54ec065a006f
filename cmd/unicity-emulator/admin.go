package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// The admin socket speaks JSON over HTTP on a unix socket in the emulator directory. These
// types are its requests and responses; the operator commands are its only client.

type deviceJSON struct {
	Hub string `json:"hub"`
	hubtest.DeviceInfo
}

type telemetryJSON struct {
	DeviceID      string            `json:"device_id"`
	Hub           string            `json:"hub"`
	Payload       string            `json:"payload,omitempty"`
	PayloadBase64 string            `json:"payload_base64,omitempty"` // when not UTF-8
	Properties    map[string]string `json:"properties"`
	System        map[string]string `json:"system"`
	Received      time.Time         `json:"received"`
}

type c2dRequest struct {
	Device     string            `json:"device"`
	Payload    string            `json:"payload"`
	Properties map[string]string `json:"properties,omitempty"`
}

type invokeRequest struct {
	Device         string          `json:"device"`
	Method         string          `json:"method"`
	Payload        json.RawMessage `json:"payload,omitempty"`
	TimeoutSeconds float64         `json:"timeout_seconds"`
}

type twinRequest struct {
	Device  string          `json:"device"`
	Desired json.RawMessage `json:"desired"`
}

type deviceRequest struct {
	Device string `json:"device"`
	Enable bool   `json:"enable,omitempty"`
	Hub    string `json:"hub,omitempty"` // move: the destination
}

type enrollRequest struct {
	Group          string          `json:"group,omitempty"`
	RegistrationID string          `json:"registration_id,omitempty"`
	CAPEM          string          `json:"ca_pem,omitempty"`
	Thumbprint     string          `json:"thumbprint,omitempty"`
	SymmetricKey   []byte          `json:"symmetric_key,omitempty"`
	EndorsementKey []byte          `json:"endorsement_key,omitempty"` // a TPM's EK, TPM2B_PUBLIC
	DeviceID       string          `json:"device_id,omitempty"`
	Disabled       bool            `json:"disabled,omitempty"`
	InitialTwin    json.RawMessage `json:"initial_twin,omitempty"`
	// Custom allocation (allocation.go): a static AllocationResponse, or the path of a
	// program that answers each AllocationRequest.
	AllocationReply  json.RawMessage `json:"allocation_reply,omitempty"`
	AllocationScript string          `json:"allocation_script,omitempty"`
}

type admin struct {
	fleet       *hubtest.Fleet
	dps         *dpstest.Server
	enrollments *enrollments
	policies    *policies
}

func newAdminHandler(a *admin) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/devices", a.devices)
	mux.HandleFunc("GET /v1/refusals", a.refusals)
	mux.HandleFunc("GET /v1/telemetry", a.telemetry)
	mux.HandleFunc("POST /v1/c2d", a.c2d)
	mux.HandleFunc("POST /v1/invoke", a.invoke)
	mux.HandleFunc("GET /v1/twin", a.twin)
	mux.HandleFunc("PATCH /v1/twin", a.patchTwin)
	mux.HandleFunc("POST /v1/disable", a.disable)
	mux.HandleFunc("POST /v1/delete", a.delete)
	mux.HandleFunc("POST /v1/move", a.move)
	mux.HandleFunc("POST /v1/enroll", a.enroll)
	mux.HandleFunc("GET /v1/registrations", a.registrations)
	mux.HandleFunc("GET /v1/stats", a.stats)
	mux.HandleFunc("GET /metrics", a.metrics)
	mux.HandleFunc("POST /v1/policy", a.policy)
	mux.HandleFunc("POST /v1/revoke", a.revoke)
	mux.HandleFunc("POST /v1/renewal-fault", a.renewalFault)
	return mux
}

func (a *admin) devices(w http.ResponseWriter, _ *http.Request) {
	out := []deviceJSON{}
	for _, h := range a.fleet.Hubs() {
		for _, d := range h.Devices() {
			out = append(out, deviceJSON{Hub: h.Name(), DeviceInfo: d})
		}
	}
	reply(w, out, nil)
}

type refusalJSON struct {
	Hub string `json:"hub"`
	hubtest.Refusal
}

func (a *admin) refusals(w http.ResponseWriter, _ *http.Request) {
	out := []refusalJSON{}
	for _, h := range a.fleet.Hubs() {
		for _, r := range h.Refusals() {
			out = append(out, refusalJSON{Hub: h.Name(), Refusal: r})
		}
	}
	reply(w, out, nil)
}

// telemetry lists what was received; with wait=N it first waits (up to timeout) until the
// device has sent N messages.
func (a *admin) telemetry(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	device := q.Get("device")
	if n, _ := strconv.Atoi(q.Get("wait")); n > 0 {
		timeout, err := time.ParseDuration(q.Get("timeout"))
		if err != nil {
			timeout = 30 * time.Second
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		if err := a.waitTelemetry(ctx, device, n); err != nil {
			reply(w, nil, err)
			return
		}
	}
	out := []telemetryJSON{}
	for _, h := range a.fleet.Hubs() {
		for _, m := range h.Telemetry(device) {
			t := telemetryJSON{DeviceID: m.DeviceID, Hub: h.Name(), Properties: m.Properties, System: m.System, Received: m.Received}
			if utf8.Valid(m.Payload) {
				t.Payload = string(m.Payload)
			} else {
				t.PayloadBase64 = base64.StdEncoding.EncodeToString(m.Payload)
			}
			out = append(out, t)
		}
	}
	reply(w, out, nil)
}

// waitTelemetry counts across hubs, since a device may have moved between them; it polls
// because no single hub can say when the sum changes.
func (a *admin) waitTelemetry(ctx context.Context, device string, n int) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		total := 0
		for _, h := range a.fleet.Hubs() {
			total += len(h.Telemetry(device))
		}
		if total >= n {
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return fmt.Errorf("%w: %d of %d messages from %q", hubtest.ErrTimeout, total, n, device)
		}
	}
}

func (a *admin) c2d(w http.ResponseWriter, r *http.Request) {
	var req c2dRequest
	if !decode(w, r, &req) {
		return
	}
	h, ok := a.hubOf(w, req.Device)
	if !ok {
		return
	}
	id, err := h.SendC2D(req.Device, []byte(req.Payload), req.Properties)
	reply(w, map[string]string{"message_id": id, "hub": h.Name()}, err)
}

func (a *admin) invoke(w http.ResponseWriter, r *http.Request) {
	var req invokeRequest
	if !decode(w, r, &req) {
		return
	}
	h, ok := a.hubOf(w, req.Device)
	if !ok {
		return
	}
	timeout := defaultMethodTimeout
	if req.TimeoutSeconds != 0 {
		timeout = time.Duration(req.TimeoutSeconds * float64(time.Second))
	}
	if timeout < minMethodTimeout || timeout > maxMethodTimeout {
		httpError(w, http.StatusBadRequest, fmt.Errorf("response timeout %v: IoT Hub allows %v to %v", timeout, minMethodTimeout, maxMethodTimeout))
		return
	}
	if len(req.Payload) == 0 {
		// The service sends JSON null when the caller gives no payload; some SDKs (Node's)
		// answer an empty body with 400.
		req.Payload = json.RawMessage("null")
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	res, err := h.Invoke(ctx, req.Device, req.Method, req.Payload)
	if err != nil {
		methodError(w, err)
		return
	}
	reply(w, res, nil)
}

// IoT Hub's bounds and default for responseTimeoutInSeconds (DOC-METHODS).
const (
	minMethodTimeout     = 5 * time.Second
	maxMethodTimeout     = 300 * time.Second
	defaultMethodTimeout = 30 * time.Second
)

// methodErrorJSON is a failed method invocation as the service answers it: the HTTP status,
// its six-digit error code and message, and the emulator's own explanation.
type methodErrorJSON struct {
	Status    int    `json:"status"`
	ErrorCode int    `json:"error_code"`
	Message   string `json:"message"`
	Error     string `json:"error"`
}

// methodError answers a failed invocation with the status, code and message IoT Hub gives.
func methodError(w http.ResponseWriter, err error) {
	e := methodErrorJSON{Status: http.StatusBadRequest, ErrorCode: 400000, Message: "Bad request.", Error: err.Error()}
	switch {
	case errors.Is(err, hubtest.ErrTimeout):
		e.Status, e.ErrorCode, e.Message = http.StatusGatewayTimeout, 504101, "Timed out waiting for the response from device."
	case errors.Is(err, hubtest.ErrDeviceNotOnline):
		e.Status, e.ErrorCode, e.Message = http.StatusNotFound, 404103, "Timed out waiting for device to connect."
	case errors.Is(err, hubtest.ErrDeviceNotFound):
		e.Status, e.ErrorCode, e.Message = http.StatusNotFound, 404001, "Device not found."
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Status)
	json.NewEncoder(w).Encode(e)
}

func (a *admin) twin(w http.ResponseWriter, r *http.Request) {
	device := r.URL.Query().Get("device")
	h, ok := a.hubOf(w, device)
	if !ok {
		return
	}
	tw, err := h.Twin(device)
	reply(w, tw, err)
}

func (a *admin) patchTwin(w http.ResponseWriter, r *http.Request) {
	var req twinRequest
	if !decode(w, r, &req) {
		return
	}
	h, ok := a.hubOf(w, req.Device)
	if !ok {
		return
	}
	if _, err := h.PatchDesired(req.Device, req.Desired); err != nil {
		reply(w, nil, err)
		return
	}
	tw, err := h.Twin(req.Device)
	reply(w, tw, err)
}

func (a *admin) disable(w http.ResponseWriter, r *http.Request) {
	var req deviceRequest
	if !decode(w, r, &req) {
		return
	}
	h, err := a.fleet.Find(req.Device)
	if err == nil {
		err = h.SetDisabled(req.Device, !req.Enable)
	}
	a.deviceReply(w, req.Device, err)
}

func (a *admin) delete(w http.ResponseWriter, r *http.Request) {
	var req deviceRequest
	if !decode(w, r, &req) {
		return
	}
	h, err := a.fleet.Find(req.Device)
	if err == nil {
		err = h.Delete(req.Device)
	}
	reply(w, map[string]string{"device_id": req.Device, "deleted_from": hubName(h)}, err)
}

func (a *admin) move(w http.ResponseWriter, r *http.Request) {
	var req deviceRequest
	if !decode(w, r, &req) {
		return
	}
	a.deviceReply(w, req.Device, a.fleet.Move(req.Device, req.Hub))
}

// hubOf finds the hub that holds device, or answers the request with why it cannot.
func (a *admin) hubOf(w http.ResponseWriter, device string) (*hubtest.Hub, bool) {
	h, err := a.fleet.Find(device)
	if err != nil {
		reply(w, nil, err)
	}
	return h, err == nil
}

// deviceReply answers with the device's registry entry after a change.
func (a *admin) deviceReply(w http.ResponseWriter, device string, err error) {
	if err != nil {
		reply(w, nil, err)
		return
	}
	h, ok := a.hubOf(w, device)
	if !ok {
		return
	}
	info, err := h.Device(device)
	reply(w, deviceJSON{Hub: h.Name(), DeviceInfo: info}, err)
}

func (a *admin) enroll(w http.ResponseWriter, r *http.Request) {
	var req enrollRequest
	if !decode(w, r, &req) {
		return
	}
	if err := a.enrollments.add(a.dps, a.fleet.Allocate, req); err != nil {
		httpError(w, http.StatusBadRequest, err)
		return
	}
	if err := a.policies.reapply(a.dps, req); err != nil {
		httpError(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, map[string]any{"enrolled": req.Group + req.RegistrationID, "group": req.Group != ""}, nil)
}

func hubName(h *hubtest.Hub) string {
	if h == nil {
		return ""
	}
	return h.Name()
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		httpError(w, http.StatusBadRequest, fmt.Errorf("bad request: %w", err))
		return false
	}
	return true
}

// reply writes v, or err with the status IoT Hub would give it.
func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		status := http.StatusBadRequest
		switch {
		case errors.Is(err, hubtest.ErrDeviceNotFound), errors.Is(err, hubtest.ErrDeviceNotOnline),
			errors.Is(err, dpstest.ErrNotFound):
			status = http.StatusNotFound
		case errors.Is(err, hubtest.ErrTimeout):
			status = http.StatusGatewayTimeout
		case errors.Is(err, hubtest.ErrQueueFull):
			status = http.StatusForbidden
		}
		httpError(w, status, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func httpError(w http.ResponseWriter, status int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

// adminClient talks to a running emulator through its socket.
type adminClient struct {
	dir  string
	http *http.Client
}

func newAdminClient(dir string) *adminClient {
	sock := filepath.Join(dir, adminSocketFile)
	return &adminClient{dir: dir, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}}
}

// errAdmin is an error the emulator answered with.
type errAdmin struct {
	status int
	msg    string
	body   []byte // the whole answer
}

func (e *errAdmin) Error() string { return e.msg }

// call sends in (nil for GET) and decodes the answer into out.
func (c *adminClient) call(ctx context.Context, method, path string, query url.Values, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	u := "http://emulator" + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("no emulator is serving %s (start 'unicity-emulator serve --dir %s'): %w", c.dir, c.dir, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = resp.Status
		}
		return &errAdmin{status: resp.StatusCode, msg: e.Error, body: data}
	}
	return json.Unmarshal(data, out)
}
