{{ forex_ohlc('h1') }}
