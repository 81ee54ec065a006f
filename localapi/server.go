package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/clock"
	"github.com/unicity-iot/unicity/storage"
	"github.com/unicity-iot/unicity/telemetry"
)

// Agent is what the local API asks of the agent (device.Agent).
type Agent interface {
	Status() device.Status
	// Subscribe streams status changes until cancel is called.
	Subscribe() (updates <-chan device.Status, cancel func())
	// Register asks the lifecycle for a registration (see device.Request).
	Register(ctx context.Context, r device.Request) (*storage.State, error)
}

// Gateway is the hub session as the applications' routes use it (package gateway).
type Gateway interface {
	// Submit stores application app's telemetry message and, with wait above zero, waits up
	// to wait for the hub's PUBACK: package telemetry's errors, or one marked ErrNotReady
	// before the store is open.
	Submit(ctx context.Context, app string, m hub.Message, wait time.Duration) (telemetry.Receipt, error)
	// TelemetryStatus is the telemetry queue's figures for the status.
	TelemetryStatus() *device.TelemetryStatus
	Twin(ctx context.Context) (hub.Twin, error)
	// UpdateReported patches the reported properties; what the application may not patch is
	// refused with an error marked ErrBadRequest.
	UpdateReported(ctx context.Context, patch map[string]json.RawMessage) (int64, error)
	// Subscribe opens an application's event stream: its first event is "subscribed".
	Subscribe(f Filter) *Stream
	// Answer delivers an application's answer to method call id; false if no call waits.
	Answer(id string, r hub.MethodResponse) bool
}

// Filter is what an application's event stream carries.
type Filter struct {
	C2D, Desired bool
	Methods      []string
}

// Stream is an application's event stream. Done is closed when the gateway drops it (the
// application fell too far behind); Close ends it from the application's side.
type Stream struct {
	Events <-chan Event
	Done   <-chan struct{}
	Close  func()
}

// ErrBadRequest marks a request the gateway refuses as the application's mistake (400).
var ErrBadRequest = errors.New("bad request")

// ErrNotReady marks a request the gateway cannot serve yet (503 with Retry-After): the
// telemetry store opens once the agent has found the clock valid.
var ErrNotReady = errors.New("not ready")

// notReadyRetry is the Retry-After of a 503 before the agent is ready.
const notReadyRetry = 5 * time.Second

// AppHeader names the application a telemetry message comes from, for the order of its
// messages; without it, the application is the peer's user (uid:N, from SO_PEERCRED).
const AppHeader = "X-Unicity-App"

// maxAppName bounds AppHeader: it is stored with every message.
const maxAppName = 64

// Request body limits: the hub's own limits with room for JSON and base64.
const (
	maxTelemetryBody = 512 << 10
	maxPatchBody     = 64 << 10
	maxResponseBody  = 256 << 10

	defaultSendWait = 30 * time.Second
	maxSendWait     = 5 * time.Minute
	hubCallTimeout  = time.Minute
)

// Server serves the local API for the agent and, when set, its gateway.
type Server struct {
	Agent Agent
	// Gateway, when set, adds the applications' routes.
	Gateway Gateway
	// Clock dates Retry-After; nil means the system clock.
	Clock clock.Clock
}

// Serve serves the local API on ln until ctx ends, then removes the socket.
func (s *Server) Serve(ctx context.Context, ln net.Listener) {
	if s.Clock == nil {
		s.Clock = clock.System{}
	}
	mux := http.NewServeMux()
	s.routes(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }, ConnContext: withPeer}
	shut := make(chan struct{})
	go func() {
		defer close(shut)
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if srv.Shutdown(shutdown) != nil {
			srv.Close()
		}
	}()
	if errors.Is(srv.Serve(ln), http.ErrServerClosed) {
		// Serve returns as the shutdown begins: wait for the requests under way to end.
		<-shut
	}
	os.Remove(ln.Addr().String())
}

func (s *Server) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	mux.HandleFunc("POST /v1/reprovision", s.handleReprovision)
	if s.Gateway != nil {
		mux.HandleFunc("POST /v1/telemetry", s.handleTelemetry)
		mux.HandleFunc("GET /v1/twin", s.handleTwin)
		mux.HandleFunc("PATCH /v1/twin/reported", s.handlePatchReported)
		mux.HandleFunc("GET /v1/events", s.handleEvents)
		mux.HandleFunc("POST /v1/methods/{id}/response", s.handleMethodResponse)
	}
}

func (s *Server) handleStatus(w http.ResponseWriter, _ *http.Request) {
	st := s.Agent.Status()
	if s.Gateway != nil {
		st.Telemetry = s.Gateway.TelemetryStatus()
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(st)
}

// handleReprovision asks the loop for a registration. ?force=1 skips the rate limit;
// ?provision=1 only registers a device that has no assignment. An answer the agent gives
// before it starts registering comes whole, with its status: 200 and the assignment in
// force, or the error's status (429 and Retry-After when rate-limited, 503 when the agent
// cannot register now). Once the registration has started, the answer is 200 and its
// progress as JSON lines, the last one the new assignment or the error.
func (s *Server) handleReprovision(w http.ResponseWriter, r *http.Request) {
	started := make(chan struct{})
	req := device.Request{Started: func() { close(started) }}
	for name, v := range map[string]*bool{"force": &req.Force, "provision": &req.ProvisionOnly} {
		if q := r.URL.Query().Get(name); q != "" {
			b, err := strconv.ParseBool(q)
			if err != nil {
				apiError(w, http.StatusBadRequest, fmt.Sprintf("%s: want 1 or 0, not %q", name, q))
				return
			}
			*v = b
		}
	}
	updates, cancel := s.Agent.Subscribe()
	defer cancel()
	type result struct {
		state *storage.State
		err   error
	}
	done := make(chan result, 1)
	go func() {
		st, err := s.Agent.Register(r.Context(), req)
		done <- result{st, err}
	}()

	select {
	case res := <-done:
		if res.err != nil {
			if wait := device.RetryAfter(res.err, s.Clock.Now()); wait > 0 {
				w.Header().Set("Retry-After", seconds(wait))
			}
			writeJSON(w, RegistrationStatus(res.err), progressLine{Error: res.err.Error(), Kind: kindOf(res.err)})
			return
		}
		asg := AssignmentOf(res.state)
		writeJSON(w, http.StatusOK, progressLine{Assignment: &asg})
		return
	case <-started:
	}

	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	for {
		select {
		case st := <-updates:
			enc.Encode(progressLine{Status: &st})
			flush()
		case res := <-done:
			if res.err != nil {
				enc.Encode(progressLine{Error: res.err.Error(), Kind: kindOf(res.err)})
			} else {
				asg := AssignmentOf(res.state)
				enc.Encode(progressLine{Assignment: &asg})
			}
			return
		}
	}
}

// TelemetryAnswer is the body of a POST /v1/telemetry answer that is not an error, and of
// a 504 or a 503 that came before the message was known to be stored (MessageID, to send it
// again as itself).
type TelemetryAnswer struct {
	// Delivered: the hub acknowledged it (200). Queued: stored, and it will be sent (202).
	Delivered bool   `json:"delivered"`
	Queued    bool   `json:"queued,omitempty"`
	MessageID string `json:"message_id,omitempty"`
	Error     string `json:"error,omitempty"`
}

// handleTelemetry stores a message in the agent's telemetry queue: answered once the hub
// acknowledged it (200), within ?timeout=, or once it is durable with ?wait=0 (202). A
// message stored whose acknowledgement did not come in time is 202 too: it will be sent.
func (s *Server) handleTelemetry(w http.ResponseWriter, r *http.Request) {
	var req TelemetryRequest
	if !decodeBody(w, r, maxTelemetryBody, &req) {
		return
	}
	if len(req.Payload) > 0 && len(req.PayloadBase64) > 0 {
		apiError(w, http.StatusBadRequest, "give payload or payload_base64, not both")
		return
	}
	app, err := appOf(r)
	if err != nil {
		apiError(w, http.StatusBadRequest, err.Error())
		return
	}
	m := hub.Message{Payload: req.PayloadBase64, Properties: req.Properties}
	if len(req.Payload) > 0 {
		m.Payload = req.Payload
	}
	wait := defaultSendWait
	switch q := r.URL.Query(); {
	case q.Get("wait") == "0":
		wait = 0
	case q.Get("timeout") != "":
		d, err := time.ParseDuration(q.Get("timeout"))
		if err != nil || d <= 0 || d > maxSendWait {
			apiError(w, http.StatusBadRequest, fmt.Sprintf("timeout: want a duration up to %s, such as 10s", maxSendWait))
			return
		}
		wait = d
	}
	receipt, err := s.Gateway.Submit(r.Context(), app, m, wait)
	switch {
	case err == nil && receipt.Delivered:
		writeJSON(w, http.StatusOK, TelemetryAnswer{Delivered: true, MessageID: receipt.MID})
	case err == nil, errors.Is(err, telemetry.ErrNotConfirmed):
		writeJSON(w, http.StatusAccepted, TelemetryAnswer{Queued: true, MessageID: receipt.MID})
	default:
		telemetryError(w, err, receipt.MID)
	}
}

// telemetryError answers a message refused, or not known to be stored, as package
// telemetry's doc maps its errors.
func telemetryError(w http.ResponseWriter, err error, mid string) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNotReady):
		w.Header().Set("Retry-After", seconds(notReadyRetry))
		status = http.StatusServiceUnavailable
	case errors.Is(err, telemetry.ErrInvalid):
		status = http.StatusBadRequest
	case errors.Is(err, telemetry.ErrTooLarge):
		status = http.StatusRequestEntityTooLarge
	case errors.Is(err, telemetry.ErrFull):
		w.Header().Set("Retry-After", seconds(telemetry.RetryAfter))
		status = http.StatusInsufficientStorage
	case errors.Is(err, telemetry.ErrDropped):
		status = http.StatusInsufficientStorage
	case errors.Is(err, telemetry.ErrClosed), errors.Is(err, context.Canceled):
		status = http.StatusServiceUnavailable // the agent is stopping
	case errors.Is(err, context.DeadlineExceeded):
		status = http.StatusGatewayTimeout
	}
	writeJSON(w, status, TelemetryAnswer{MessageID: mid, Error: err.Error()})
}

func seconds(d time.Duration) string {
	return strconv.FormatInt(int64((d+time.Second-1)/time.Second), 10)
}

// appOf is the application a request comes from: AppHeader, or the peer's user.
func appOf(r *http.Request) (string, error) {
	if name := r.Header.Get(AppHeader); name != "" {
		if len(name) > maxAppName || strings.ContainsFunc(name, func(c rune) bool { return c < 0x21 || c > 0x7e }) {
			return "", fmt.Errorf("%s: want at most %d printable ASCII characters without spaces", AppHeader, maxAppName)
		}
		return name, nil
	}
	return peerOf(r.Context()), nil
}

func (s *Server) handleTwin(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), hubCallTimeout)
	defer cancel()
	t, err := s.Gateway.Twin(ctx)
	if err != nil {
		hubError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, t)
}

func (s *Server) handlePatchReported(w http.ResponseWriter, r *http.Request) {
	var patch map[string]json.RawMessage
	if !decodeBody(w, r, maxPatchBody, &patch) {
		return
	}
	if patch == nil {
		apiError(w, http.StatusBadRequest, "the patch must be a JSON object")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), hubCallTimeout)
	defer cancel()
	v, err := s.Gateway.UpdateReported(ctx, patch)
	if err != nil {
		hubError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]int64{"version": v})
}

func hubError(w http.ResponseWriter, err error) {
	var se *hub.StatusError
	switch {
	case errors.Is(err, ErrBadRequest), errors.As(err, &se) && se.Status == http.StatusBadRequest:
		apiError(w, http.StatusBadRequest, err.Error())
	case errors.As(err, &se):
		apiError(w, http.StatusBadGateway, err.Error())
	case errors.Is(err, hub.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		apiError(w, http.StatusGatewayTimeout, err.Error())
	default:
		apiError(w, http.StatusServiceUnavailable, err.Error())
	}
}

// handleEvents streams what the application subscribed to as JSON lines until it hangs up,
// or falls so far behind that the agent drops it.
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := Filter{C2D: q.Get("c2d") == "1", Desired: q.Get("desired") == "1"}
	for _, m := range q["method"] {
		for name := range strings.SplitSeq(m, ",") {
			switch {
			case name == "":
			case strings.HasPrefix(name, "unicity."):
				apiError(w, http.StatusBadRequest, fmt.Sprintf("method %q: unicity.* methods belong to the agent", name))
				return
			default:
				f.Methods = append(f.Methods, name)
			}
		}
	}
	if !f.C2D && !f.Desired && len(f.Methods) == 0 {
		apiError(w, http.StatusBadRequest, "subscribe to something: c2d=1, desired=1 or method=NAME")
		return
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		apiError(w, http.StatusInternalServerError, "streaming unsupported")
		return
	}
	stream := s.Gateway.Subscribe(f)
	defer stream.Close()

	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	for {
		select {
		case e := <-stream.Events:
			if enc.Encode(e) != nil {
				return
			}
			if len(stream.Events) == 0 {
				flusher.Flush()
			}
		case <-stream.Done:
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (s *Server) handleMethodResponse(w http.ResponseWriter, r *http.Request) {
	var a MethodAnswer
	if !decodeBody(w, r, maxResponseBody, &a) {
		return
	}
	if a.Status == nil || *a.Status < 0 || *a.Status > 65535 {
		apiError(w, http.StatusBadRequest, "status: want an integer from 0 to 65535")
		return
	}
	if !s.Gateway.Answer(r.PathValue("id"), hub.MethodResponse{Status: *a.Status, Payload: a.Payload}) {
		apiError(w, http.StatusNotFound, "no method call is waiting for this answer (it may have timed out)")
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"answered": true})
}

// decodeBody reads one JSON value of at most limit bytes, strictly; on failure it answers
// 400 (or 413) with the reason and returns false.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("trailing data after the JSON value")
	}
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON value")
		}
	}
	var tooBig *http.MaxBytesError
	switch {
	case err == nil:
		return true
	case errors.As(err, &tooBig):
		apiError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", limit))
	default:
		apiError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
	}
	return false
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func apiError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
