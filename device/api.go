package device

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/config"
	"github.com/unicity-iot/unicity/storage"
)

// The local API: HTTP with JSON bodies over a Unix socket in the runtime directory, for the
// CLI and the gateway's own applications. Every route is registered in routes below.

// APISocketName is the socket's name in the runtime directory.
const APISocketName = "api.sock"

// ErrNotRunning: no agent answers on the local API socket.
var ErrNotRunning = errors.New("the unicity service is not running")

// APISocket is the socket's path for cfg.
func APISocket(cfg *config.Config) string { return filepath.Join(cfg.Runtime.Dir, APISocketName) }

// ListenAPI opens the local API socket (mode 0660, group from [api] group). A socket left by
// an agent that died is replaced; one that answers belongs to a running agent and is an error.
func ListenAPI(cfg *config.Config) (net.Listener, error) {
	path := APISocket(cfg)
	if err := os.MkdirAll(cfg.Runtime.Dir, 0o755); err != nil {
		return nil, &config.Error{File: cfg.Path, Key: "runtime.dir", Err: fmt.Errorf("cannot create the runtime directory: %w", err)}
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another unicity agent is serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cannot remove the stale API socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		err = fmt.Errorf("cannot listen on the API socket: %w", err)
		if errors.Is(err, os.ErrPermission) {
			return nil, &config.Error{File: cfg.Path, Key: "runtime.dir", Err: err}
		}
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("cannot set the API socket's mode: %w", err)
	}
	gid, err := cfg.APIGroupID()
	if err != nil {
		ln.Close()
		return nil, err
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("cannot give the API socket to group %s: %w", cfg.API.Group, err)
		}
	}
	return ln, nil
}

// serveAPI serves the local API on ln until ctx ends.
func (a *Agent) serveAPI(ctx context.Context, ln net.Listener) {
	mux := http.NewServeMux()
	a.routes(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if srv.Shutdown(shutdown) != nil {
			srv.Close()
		}
	}()
	srv.Serve(ln)
	os.Remove(ln.Addr().String())
}

func (a *Agent) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/status", a.handleStatus)
	mux.HandleFunc("POST /v1/reprovision", a.handleReprovision)
	if a.Gateway != nil {
		a.Gateway.routes(mux)
	}
}

func (a *Agent) handleStatus(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(a.Status())
}

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
	Status     *Status     `json:"status,omitempty"`
	Assignment *Assignment `json:"assignment,omitempty"`
	Error      string      `json:"error,omitempty"`
	Kind       string      `json:"kind,omitempty"`
}

// handleReprovision asks the loop for a registration. ?force=1 skips the rate limit;
// ?provision=1 only registers a device that has no assignment. An answer the agent gives
// before it starts registering comes whole, with its status: 200 and the assignment in
// force, or the error's status (429 and Retry-After when rate-limited, 503 when the agent
// cannot register now). Once the registration has started, the answer is 200 and its
// progress as JSON lines, the last one the new assignment or the error.
func (a *Agent) handleReprovision(w http.ResponseWriter, r *http.Request) {
	req := &request{started: make(chan struct{})}
	for name, v := range map[string]*bool{"force": &req.force, "provision": &req.provision} {
		if q := r.URL.Query().Get(name); q != "" {
			b, err := strconv.ParseBool(q)
			if err != nil {
				apiError(w, http.StatusBadRequest, fmt.Sprintf("%s: want 1 or 0, not %q", name, q))
				return
			}
			*v = b
		}
	}
	updates, cancel := a.subscribe()
	defer cancel()
	done := make(chan result, 1)
	go func() {
		st, err := a.ask(r.Context(), req)
		done <- result{st, err}
	}()

	select {
	case res := <-done:
		if res.err != nil {
			if wait := retryAfterOf(res.err, a.Clock.Now()); wait > 0 {
				w.Header().Set("Retry-After", strconv.FormatInt(int64((wait+time.Second-1)/time.Second), 10))
			}
			writeJSON(w, reprovisionStatus(res.err), progressLine{Error: res.err.Error(), Kind: kindOf(res.err)})
			return
		}
		asg := AssignmentOf(res.state)
		writeJSON(w, http.StatusOK, progressLine{Assignment: &asg})
		return
	case <-req.started:
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
		case s := <-updates:
			enc.Encode(progressLine{Status: &s})
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

// retryAfterOf is how long after now a failed request may be retried, when known.
func retryAfterOf(err error, now time.Time) time.Duration {
	var rl *RateLimitError
	if errors.As(err, &rl) {
		return rl.Next.Sub(now)
	}
	return retryAfter(err)
}

// Error kinds on the wire, so that the CLI keeps its exit codes across the socket.
var kinds = []struct {
	name string
	err  error
}{
	{"refused", ErrRefused},
	{"unreachable", ErrUnreachable},
	{"temporary", ErrTemporary},
	{"identity", ErrIdentity},
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
			return Mark(err, k.err)
		}
	}
	return err
}

// Client talks to a running agent over the local API socket.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the agent configured by cfg.
func NewClient(cfg *config.Config) *Client {
	path := APISocket(cfg)
	return &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
				return nil, fmt.Errorf("%w (no agent at %s)", ErrNotRunning, path)
			}
			return c, err
		},
	}}}
}

// do makes a request. An answer other than 200 is returned as an error: the agent's own
// words and kind when its body carries them.
func (c *Client) do(ctx context.Context, method, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://unicity"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	var answer progressLine
	if json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&answer) == nil && answer.Error != "" {
		return nil, errorOfKind(answer.Error, answer.Kind)
	}
	return nil, fmt.Errorf("agent answered %s to %s %s", resp.Status, method, path)
}

// Status asks the running agent for its status. ErrNotRunning when no agent answers.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var s Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("cannot read the agent's status: %w", err)
	}
	return &s, nil
}

// Reprovision asks the running agent to register again (or, with provisionOnly, to register
// only if it has no assignment) and returns the assignment in force afterwards. progress
// receives the agent's status changes meanwhile. ErrNotRunning when no agent answers.
func (c *Client) Reprovision(ctx context.Context, force, provisionOnly bool, progress func(Status)) (*Assignment, error) {
	path := "/v1/reprovision?force=" + boolParam(force) + "&provision=" + boolParam(provisionOnly)
	resp, err := c.do(ctx, http.MethodPost, path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	last := ""
	for sc.Scan() {
		var line progressLine
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return nil, fmt.Errorf("cannot read the agent's answer: %w", err)
		}
		switch {
		case line.Status != nil:
			last = line.Status.Message
			if progress != nil {
				progress(*line.Status)
			}
		case line.Assignment != nil:
			return line.Assignment, nil
		case line.Error != "":
			return nil, errorOfKind(line.Error, line.Kind)
		}
	}
	if ctx.Err() != nil {
		// The agent goes on with the registration; only this wait for it ends.
		return nil, Mark(fmt.Errorf("no answer from the agent in time (it goes on; see `unicity status`): %s", last), ErrTemporary)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("cannot read the agent's answer: %w", err)
	}
	return nil, Mark(errors.New("the agent stopped before answering"), ErrTemporary)
}

func boolParam(b bool) string {
	if b {
		return "1"
	}
	return "0"
}
