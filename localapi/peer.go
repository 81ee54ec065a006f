package localapi

import (
	"context"
	"net"
	"strconv"
	"syscall"
)

type peerKey struct{}

// withPeer notes the user at the other end of a Unix socket connection (SO_PEERCRED, which
// the kernel fills in and the peer cannot forge), for the application a request comes from.
func withPeer(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	if raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}) != nil || err != nil {
		return ctx
	}
	return context.WithValue(ctx, peerKey{}, "uid:"+strconv.FormatUint(uint64(cred.Uid), 10))
}

// peerOf is the peer's user noted by withPeer, "uid:N", or "" when unknown.
func peerOf(ctx context.Context) string {
	s, _ := ctx.Value(peerKey{}).(string)
	return s
}
