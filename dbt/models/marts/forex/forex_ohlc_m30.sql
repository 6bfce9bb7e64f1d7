{{ forex_ohlc('m30') }}
