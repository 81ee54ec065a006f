package hub

import (
	"context"
	"encoding/json"
	"net/url"
	"strconv"
	"strings"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// MethodCall is a direct method invocation from the cloud.
type MethodCall struct {
	Name    string
	Payload json.RawMessage // nil when the caller sent none
}

// MethodResponse is the device's answer: a status the caller sees (200 for success by
// convention) and an optional JSON payload.
type MethodResponse struct {
	Status  int
	Payload json.RawMessage
}

// methodCall starts a handler for "$iothub/methods/POST/{name}/?$rid={rid}".
func (c *Client) methodCall(r *runState, topic string, body []byte) {
	rest := strings.TrimPrefix(topic, methodPrefix)
	i := strings.LastIndex(rest, "/?")
	if i < 0 {
		return
	}
	q, _ := url.ParseQuery(rest[i+2:])
	rid := q.Get("$rid")
	if rid == "" {
		return
	}
	call := MethodCall{Name: rest[:i]}
	if len(body) > 0 {
		call.Payload = json.RawMessage(body)
	}
	r.methods.Add(1)
	go func() {
		defer r.methods.Done()
		select {
		case r.methodSem <- struct{}{}:
			defer func() { <-r.methodSem }()
		default:
			c.respond(rid, MethodResponse{Status: 429, Payload: errorPayload("too many method calls in progress")})
			return
		}
		c.respond(rid, c.invoke(r.ctx, call))
	}()
}

func (c *Client) invoke(ctx context.Context, call MethodCall) MethodResponse {
	if c.cfg.OnMethod == nil {
		return MethodResponse{Status: 501, Payload: errorPayload("method " + call.Name + " is not implemented")}
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.MethodTimeout)
	defer cancel()
	resp := c.cfg.OnMethod(ctx, call)
	switch {
	case len(resp.Payload) > MaxMethodResponseSize:
		return MethodResponse{Status: 500, Payload: errorPayload("method response exceeds the hub's limit of 128 KiB")}
	case len(resp.Payload) > 0 && !json.Valid(resp.Payload):
		return MethodResponse{Status: 500, Payload: errorPayload("method handler answered invalid JSON")}
	}
	return resp
}

// respond publishes a method response on the current connection. If the call's connection
// has ended the hub has already failed the call, and the answer is dropped.
func (c *Client) respond(rid string, resp MethodResponse) {
	cn := c.current()
	if cn == nil {
		return
	}
	topic := "$iothub/methods/res/" + strconv.Itoa(resp.Status) + "/?$rid=" + url.QueryEscape(rid)
	tok, err := c.handoff(context.Background(), cn, func() mqtt.Token { return cn.mc.Publish(topic, 0, false, []byte(resp.Payload)) })
	if err != nil {
		return
	}
	select {
	case <-tok.Done():
	case <-cn.lost:
	}
}

func errorPayload(msg string) json.RawMessage {
	b, _ := json.Marshal(map[string]string{"message": msg})
	return b
}
