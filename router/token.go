package router

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// TXIDHeader carries a read-your-writes token: on a write's response, the
// positions the write left its databases at; on a read, the positions
// the read must see.
const TXIDHeader = "Meridian-TXID"

// TXIDCookie carries the same token as TXIDHeader, for browsers.
const TXIDCookie = "meridian_txid"

// Token is a read-your-writes token: for each database, the TXID a read
// must see. Written as "app.db=000000000000002a" entries (the TXID in the
// 16 hex digits the LTX log uses), separated by commas.
type Token map[string]uint64

// ParseToken parses a token as String writes it.
func ParseToken(s string) (Token, error) {
	t := make(Token)
	for e := range strings.SplitSeq(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		i := strings.LastIndexByte(e, '=')
		if i <= 0 {
			return nil, fmt.Errorf("read-your-writes token %q: entry %q is not DB=TXID", s, e)
		}
		txid, err := strconv.ParseUint(e[i+1:], 16, 64)
		if err != nil || len(e)-i-1 != 16 {
			return nil, fmt.Errorf("read-your-writes token %q: TXID %q is not 16 hex digits", s, e[i+1:])
		}
		t[e[:i]] = max(t[e[:i]], txid)
	}
	return t, nil
}

// String writes the token, its databases sorted by name.
func (t Token) String() string {
	dbs := make([]string, 0, len(t))
	for db := range t {
		dbs = append(dbs, db)
	}
	slices.Sort(dbs)
	var b strings.Builder
	for i, db := range dbs {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%016x", db, t[db])
	}
	return b.String()
}

// tokenOf returns the token a request carries, in TXIDHeader or else in
// TXIDCookie, nil if none. A token that does not parse is ignored: the
// read is served as one without a token would be.
func tokenOf(r *http.Request) (Token, error) {
	s := r.Header.Get(TXIDHeader)
	if s == "" {
		c, err := r.Cookie(TXIDCookie)
		if err != nil {
			return nil, nil
		}
		s = c.Value
	}
	return ParseToken(s)
}

// advanced returns the databases whose positions in after are past those
// in before, at their positions in after: what a write left behind.
func advanced(before, after map[string]uint64) Token {
	var t Token
	for db, txid := range after {
		if b, ok := before[db]; !ok || txid > b {
			if t == nil {
				t = make(Token)
			}
			t[db] = txid
		}
	}
	return t
}
